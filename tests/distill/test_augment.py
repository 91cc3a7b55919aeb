"""Tests of ddfast.augment: DSA (differentiable, siamese, per-op semantics), DiffAug, ZCA, Normalize."""
import numpy as np
import pytest
import torch

from ddfast.augment import (DSA, DSAParams, Compose, Identity, Normalize, ZCA, build_input_transform, diffaug,
                            transform_from_state_dict)


ALL = "color_crop_cutout_flip_scale_rotate"


def _params(groups, n, **cols):
    u = torch.full((n, 11), 0.5, dtype=torch.float64)
    names = ["brightness", "saturation", "contrast", "tx", "ty", "cut_x", "cut_y", "flip", "sx", "sy", "rot"]
    for k, v in cols.items():
        u[:, names.index(k)] = torch.as_tensor(v, dtype=torch.float64)
    return DSAParams(groups=tuple(groups), uniforms=u)


@pytest.mark.parametrize("group", ["color", "crop", "cutout", "flip", "scale", "rotate"])
def test_every_group_is_differentiable_gradcheck(group):
    dsa = DSA(ALL, mode="M")
    x = torch.rand(3, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    p = dsa.sample(3, seed=5)
    p = DSAParams(groups=(group,), uniforms=p.uniforms)
    assert torch.autograd.gradcheck(lambda t: dsa.apply(t, p), (x,))


def test_gradients_reach_images_all_modes():
    for mode in ("S", "M"):
        dsa = DSA(ALL, mode=mode)
        for seed in range(6):
            x = torch.rand(4, 3, 16, 16, requires_grad=True)
            dsa(x, seed).square().sum().backward()
            assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_same_seed_same_parameters_siamese():
    dsa = DSA(ALL, mode="S")
    real = torch.rand(20, 3, 16, 16)
    syn = real[:5].clone()
    for seed in range(10):
        p_big, p_small = dsa.sample(20, seed), dsa.sample(5, seed)
        assert p_big.groups == p_small.groups
        assert torch.equal(p_big.uniforms[:5], p_small.uniforms)
        torch.testing.assert_close(dsa(real, seed)[:5], dsa(syn, seed))
    # different seeds differ
    assert not torch.equal(dsa.sample(5, 1).uniforms, dsa.sample(5, 2).uniforms)
    # a generator works like a seed
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    torch.testing.assert_close(dsa(syn, g1), dsa(syn, g2))
    # without seed: the object's own generator (seeded at construction) -> reproducible per object
    a, b = DSA(ALL, seed=4), DSA(ALL, seed=4)
    torch.testing.assert_close(a(syn), b(syn))


def test_mode_s_picks_one_group_and_covers_all():
    dsa = DSA(ALL, mode="S")
    seen = set()
    for seed in range(200):
        p = dsa.sample(2, seed)
        assert len(p.groups) == 1
        seen.add(p.groups[0])
    assert seen == {"color", "crop", "cutout", "flip", "scale", "rotate"}
    assert DSA(ALL, mode="M").sample(2, 0).groups == ("color", "crop", "cutout", "flip", "scale", "rotate")


def test_weighted_groups_equal_mode_s_values_and_gradients():
    """apply_weighted with group_weights' one-hot equals mode 'S' exactly (the CUDA-graph form of DSA), for every
    seed's group; wrong weights are named."""
    dsa = DSA()  # all six groups, mode 'S'
    x0 = torch.rand(6, 3, 12, 12, dtype=torch.float64)
    seen = set()
    for seed in range(40):
        p = dsa.sample(6, seed)
        seen.add(p.groups[0])
        xa, xb = x0.clone().requires_grad_(True), x0.clone().requires_grad_(True)
        ya = dsa.apply(xa, p)
        yb = dsa.apply_weighted(xb, p.uniforms, dsa.group_weights(p).double())
        assert torch.equal(ya, yb), p.groups
        cot = torch.randn_like(ya)
        (ga,) = torch.autograd.grad((ya * cot).sum(), xa)
        (gb,) = torch.autograd.grad((yb * cot).sum(), xb)
        assert torch.equal(ga, gb), p.groups
    assert seen == set(dsa.groups)
    assert dsa.group_weights(dsa.sample(2, 0)).sum() == 1
    with pytest.raises(ValueError, match="weights must have shape"):
        dsa.apply_weighted(x0, dsa.sample(6, 0).uniforms, torch.ones(2))


def test_batch_shared_diffaug():
    aug = diffaug()
    assert aug.mode == "M" and aug.batch_shared and aug.groups == ("color", "crop", "cutout")
    img = torch.rand(1, 3, 16, 16)
    x = img.repeat(6, 1, 1, 1)
    out = aug(x, 0)
    for i in range(1, 6):
        torch.testing.assert_close(out[i], out[0])
    # per-sample mode gives different transforms to identical images
    out2 = DSA("color_crop_cutout", mode="M")(x, 0)
    assert not torch.allclose(out2[1], out2[0])


def test_flip_semantics():
    dsa = DSA("flip")
    x = torch.rand(2, 1, 4, 5)
    out = dsa.apply(x, _params(["flip"], 2, flip=[0.1, 0.9]))
    torch.testing.assert_close(out[0], x[0].flip(-1))
    torch.testing.assert_close(out[1], x[1])


def test_translate_matches_loop_reference():
    dsa = DSA("crop", ratio_crop_pad=0.25)  # up to 2 pixels on an 8x8 image
    x = torch.rand(3, 2, 8, 8, dtype=torch.float64)
    u_tx, u_ty = [0.0, 0.5, 0.99], [0.99, 0.3, 0.0]
    out = dsa.apply(x, _params(["crop"], 3, tx=u_tx, ty=u_ty))
    for n in range(3):
        tx = int(np.floor(u_tx[n] * 5)) - 2
        ty = int(np.floor(u_ty[n] * 5)) - 2
        ref = torch.zeros(2, 8, 8, dtype=torch.float64)
        for i in range(8):
            for j in range(8):
                if 0 <= i + ty < 8 and 0 <= j + tx < 8:
                    ref[:, i, j] = x[n, :, i + ty, j + tx]
        torch.testing.assert_close(out[n], ref)


def test_cutout_zeroes_a_half_size_square():
    dsa = DSA("cutout")
    x = torch.rand(2, 3, 16, 16) + 1.0  # strictly positive
    out = dsa.apply(x, _params(["cutout"], 2, cut_x=[0.5, 0.0], cut_y=[0.5, 0.0]))
    zero0 = (out[0] == 0).all(0)
    assert zero0.sum() == 64 and zero0[4:12, 4:12].all()  # 8x8 square fully inside
    zero1 = (out[1] == 0).all(0)
    assert zero1.sum() == 16 and zero1[:4, :4].all()  # clipped at the corner
    assert torch.equal(out[0][:, ~zero0], x[0][:, ~zero0])


def test_color_ranges_and_identity_affines():
    dsa = DSA(ALL, mode="M")
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    b = dsa.apply(x, _params(["brightness"], 3, brightness=[0.0, 0.5, 1.0 - 1e-12]))
    torch.testing.assert_close(b - x, torch.tensor([-0.5, 0.0, 0.5], dtype=torch.float64).view(3, 1, 1, 1).expand_as(x))
    c = dsa.apply(x, _params(["contrast"], 3, contrast=0.5))  # factor 1 -> identity
    torch.testing.assert_close(c, x)
    s = dsa.apply(x, _params(["saturation"], 3, saturation=0.0))  # factor 0 -> grey
    torch.testing.assert_close(s, x.mean(1, keepdim=True).expand_as(x))
    r = dsa.apply(x, _params(["rotate"], 3, rot=0.5))  # 0 degrees
    torch.testing.assert_close(r, x)
    lo, hi = 1 / 1.2, 1.2
    u_one = (1.0 - lo) / (hi - lo)
    sc = dsa.apply(x, _params(["scale"], 3, sx=u_one, sy=u_one))  # scale 1
    torch.testing.assert_close(sc, x)
    r90 = DSA("rotate", ratio_rotate=90.0).apply(x, _params(["rotate"], 3, rot=1.0))  # +90 degrees
    assert torch.allclose(r90, torch.rot90(x, 1, (2, 3))) or torch.allclose(r90, torch.rot90(x, -1, (2, 3)))


def test_dsa_bad_arguments():
    with pytest.raises(ValueError, match="unknown group"):
        DSA("color_blur")
    with pytest.raises(ValueError, match="mode"):
        DSA(ALL, mode="X")
    with pytest.raises(ValueError, match="x must be"):
        DSA(ALL)(torch.rand(3, 8, 8), 0)
    with pytest.raises(TypeError, match="seed"):
        DSA(ALL)(torch.rand(1, 3, 8, 8), 1.5)


def _images(n=600, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 1, 6, 6, generator=g)
    mix = torch.randn(36, 36, generator=g) * 0.3
    return (base.reshape(n, -1) @ mix).reshape(n, 1, 6, 6)  # correlated pixels


def test_zca_round_trip_and_whitening_against_numpy():
    x = _images()
    eps = 0.1
    zca = ZCA.fit(x, eps=eps)
    y = zca.transform(x)
    torch.testing.assert_close(zca.inverse(y), x, rtol=1e-4, atol=1e-4)
    X = x.reshape(len(x), -1).double().numpy()
    lam = np.linalg.eigvalsh(np.cov(X, rowvar=False))  # unbiased, like kornia
    cov_y = np.cov(y.reshape(len(x), -1).double().numpy(), rowvar=False)
    got = np.linalg.eigvalsh(cov_y)
    np.testing.assert_allclose(np.sort(got), np.sort(lam / (lam + eps)), rtol=2e-3, atol=2e-4)
    # full matrix: cov(y) = U diag(lam / (lam + eps)) U^T (numpy eigendecomposition as the reference)
    lam2, U = np.linalg.eigh(np.cov(X, rowvar=False))
    np.testing.assert_allclose(cov_y, (U * (lam2 / (lam2 + eps))) @ U.T, atol=2e-3)
    # when every variance is large against eps, the output covariance is the identity
    xs = x * float(np.sqrt(200 * eps / lam.min()))
    cov_s = np.cov(ZCA.fit(xs, eps=eps).transform(xs).reshape(len(x), -1).double().numpy(), rowvar=False)
    np.testing.assert_allclose(cov_s, np.eye(36), atol=0.03)
    # ZCA is the symmetric whitening: W is symmetric
    torch.testing.assert_close(zca.matrix, zca.matrix.T, rtol=1e-4, atol=1e-5)


def test_zca_state_dict_and_errors():
    x = _images(100)
    zca = ZCA.fit(x)
    sd = zca.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    z2 = ZCA.from_state_dict(sd)
    torch.testing.assert_close(z2.transform(x), zca.transform(x))
    with pytest.raises(ValueError, match="per-image shape"):
        zca.transform(torch.rand(2, 3, 6, 6))
    with pytest.raises(ValueError, match="eps"):
        ZCA.fit(x, eps=0.0)
    with pytest.raises(ValueError, match="NaN"):
        ZCA.fit(torch.full((3, 1, 2, 2), float("nan")))
    xg = x[:4].clone().requires_grad_()
    zca.transform(xg).sum().backward()
    assert xg.grad is not None


def test_normalize_compose_and_builder():
    x = torch.rand(5, 3, 4, 4)
    nrm = Normalize([0.5, 0.4, 0.3], [0.2, 0.25, 0.3])
    torch.testing.assert_close(nrm.inverse(nrm(x)), x)
    torch.testing.assert_close(nrm(x)[:, 1], (x[:, 1] - 0.4) / 0.25)
    with pytest.raises(ValueError, match="std"):
        Normalize([0.0], [0.0])
    with pytest.raises(ValueError, match="channels"):
        nrm(torch.rand(2, 1, 4, 4))
    imgs = torch.rand(300, 1, 4, 4)
    t = build_input_transform("normalize+zca", imgs, mean=[0.5], std=[0.25])
    assert isinstance(t, Compose)
    torch.testing.assert_close(t.inverse(t(imgs)), imgs, rtol=1e-4, atol=1e-4)
    t2 = transform_from_state_dict("compose", t.state_dict())
    torch.testing.assert_close(t2(imgs), t(imgs))
    assert isinstance(build_input_transform("none"), Identity)
    n2 = build_input_transform("normalize", imgs)
    np.testing.assert_allclose(n2.mean.numpy(), imgs.double().mean((0, 2, 3)).numpy())
    with pytest.raises(ValueError, match="kind"):
        build_input_transform("pca", imgs)
