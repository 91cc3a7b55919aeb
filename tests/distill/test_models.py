"""Tests of ddfast.models: parameter counts from the papers, functional calls, vmap, double backward."""
import pytest
import torch
import torch.nn as nn

from ddfast import models as M


def _n(model):
    return sum(p.numel() for p in model.parameters())


def test_convnet_param_counts_match_papers():
    # DATM/MTT ConvNet-3, width 128, instance norm: 320,010 (CIFAR-10) and 504,420 (CIFAR-100)
    assert _n(M.get_model("convnet", 3, 10, (32, 32))) == 320010
    assert _n(M.get_model("convnet", 3, 100, (32, 32))) == 504420
    assert M.num_params(M.get_model("convnet", 3, 10, 32)) == 320010


def test_rcig_param_counts_match_paper():
    m = M.get_model("convnet_rcig", 3, 10, (32, 32))
    body = sum(p.numel() for n, p in m.named_parameters() if not n.startswith("classifier"))
    assert body == 1478912
    assert m.feature_dim == 8192
    assert _n(m) == 1478912 + 8192 * 10 + 10
    assert m.widths == (128, 256, 512)
    assert not any(isinstance(x, (nn.GroupNorm, nn.BatchNorm2d)) for x in m.modules())


def test_mtt_one_channel_28px_is_treated_as_32px():
    m = M.get_model("convnet", 1, 10, (28, 28))
    assert m.features[0].padding == (3, 3)
    assert m.feature_dim == 2048 and m.feature_shape == (128, 4, 4)
    x = torch.rand(2, 1, 28, 28)
    assert m.embed(x).shape == (2, 2048)
    assert m(x).shape == (2, 10)
    assert M.get_model("convnet_rcig", 1, 10, (28, 28)).feature_dim == 8192
    # a 3-channel 32px net keeps padding 1
    assert M.get_model("convnet", 3, 10, 32).features[0].padding == (1, 1)


def test_instance_norm_is_groupnorm_c_c_with_affine():
    m = M.get_model("convnet", 3, 10, 32, fused=False)
    gns = [x for x in m.modules() if isinstance(x, nn.GroupNorm)]
    assert len(gns) == 3
    assert all(g.num_groups == g.num_channels == 128 and g.affine for g in gns)
    # GroupNorm(C, C) == instance norm with affine
    x = torch.randn(3, 128, 6, 6)
    g = gns[0]
    ref = nn.functional.instance_norm(x, weight=g.weight, bias=g.bias, eps=g.eps)
    torch.testing.assert_close(g(x), ref, rtol=1e-5, atol=1e-5)
    # the fused block: the same instance norm, then ReLU and 2x2 average pooling
    f = [x for x in M.get_model("convnet", 3, 10, 32).modules() if isinstance(x, M.InstanceNormActPool)][0]
    assert f.num_channels == 128 and f.eps == g.eps
    torch.testing.assert_close(f(x), nn.functional.avg_pool2d(torch.relu(ref), 2), rtol=1e-5, atol=1e-5)


def test_convnetd4_resnet18_shapes_and_outputs():
    d4 = M.get_model("convnetd4", 3, 200, (64, 64), width=8)
    assert d4.depth == 4 and d4.feature_dim == 8 * 4 * 4
    x = torch.randn(2, 3, 64, 64)
    logits, emb = d4(x, output="both")
    assert logits.shape == (2, 200) and emb.shape == (2, 128)
    torch.testing.assert_close(d4.classifier(emb), logits)
    r = M.get_model("resnet18", 3, 10, 32)
    assert r.conv1.kernel_size == (3, 3) and r.conv1.stride == (1, 1) and isinstance(r.maxpool, nn.Identity)
    assert r.feature_dim == 512 and r.classifier is r.fc
    r.eval()
    y = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(r.classifier(r.embed(y)), r(y))
    rin = M.get_model("resnet18_in", 1, 10, 28)
    assert not M.has_batchnorm(rin) and rin(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown model"):
        M.get_model("vgg", 3, 10, 32)
    with pytest.raises(ValueError, match="norm"):
        M.ConvNet(3, 10, norm="weird")
    with pytest.raises(ValueError, match="act"):
        M.ConvNet(3, 10, act="tanh")
    with pytest.raises(ValueError, match="too small"):
        M.ConvNet(3, 10, depth=4, im_size=(8, 8))
    with pytest.raises(TypeError):
        M.get_model("convnet", 3, 10, 32, nonsense=1)
    m = M.get_model("convnet", 3, 10, 32, width=4)
    with pytest.raises(ValueError, match="flat"):
        M.functional_forward(m, torch.zeros(5), torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="output"):
        m(torch.randn(1, 3, 32, 32), output="probs")


def test_seed_reproduces_weights_and_leaves_global_rng():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = M.flat_params(M.get_model("convnet", 3, 10, 32, seed=7, width=8))
    assert torch.equal(torch.get_rng_state(), state)
    b = M.flat_params(M.get_model("convnet", 3, 10, 32, seed=7, width=8))
    c = M.flat_params(M.get_model("convnet", 3, 10, 32, seed=8, width=8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_flat_order_unflatten_and_load_flat():
    m = M.get_model("convnet", 3, 10, 32, width=8, seed=0)
    flat = M.flat_params(m).detach()
    names = [n for n, _ in m.named_parameters()]
    assert names[0] == "features.0.weight" and names[-1] == "classifier.bias"
    ref = torch.cat([p.detach().reshape(-1) for _, p in m.named_parameters()])
    assert torch.equal(flat, ref)
    d = M.unflatten(m, flat)
    assert list(d) == names
    for n, p in m.named_parameters():
        assert torch.equal(d[n], p.detach())
    m2 = M.get_model("convnet", 3, 10, 32, width=8, seed=1)
    M.load_flat(m2, flat)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(m2(x), m(x))


@pytest.mark.parametrize("name,kw", [("convnet", {"width": 8}), ("convnet_rcig", {"act": "softplus", "base_width": 4}),
                                     ("convnet", {"width": 8, "norm": "none"}), ("resnet18_in", {})])
def test_functional_forward_equals_module(name, kw):
    m = M.get_model(name, 3, 10, 32, seed=0, **kw)
    x = torch.randn(4, 3, 32, 32)
    flat = M.flat_params(m).detach()
    torch.testing.assert_close(M.functional_forward(m, flat, x), m(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(M.functional_forward(m, flat, x, output="embed"), m.embed(x), rtol=1e-5, atol=1e-5)
    # a different flat vector changes the output (the module's own parameters are not used)
    assert not torch.allclose(M.functional_forward(m, flat * 0.5, x), m(x))


def test_functional_forward_batchnorm_buffers():
    m = M.get_model("convnet", 3, 10, 16, width=4, depth=2, norm="batch", seed=0)
    m2 = M.get_model("convnet", 3, 10, 16, width=4, depth=2, norm="batch", seed=0)
    x = torch.randn(8, 3, 16, 16)
    flat = M.flat_params(m).detach()
    out = M.functional_forward(m, flat, x)
    torch.testing.assert_close(out, m2(x))
    torch.testing.assert_close(m.features[1].running_mean, m2.features[1].running_mean)
    before = m.features[1].running_mean.clone()
    M.functional_forward(m, flat, x, track_bn_stats=False)
    assert torch.equal(m.features[1].running_mean, before)
    assert m.features[1].track_running_stats  # restored
    # vmapped forward never updates running stats, and in train mode uses batch statistics per run
    flats = torch.stack([flat, flat * 1.5])
    out2 = M.batched_forward(m, flats, x)
    assert torch.equal(m.features[1].running_mean, before)
    torch.testing.assert_close(out2[0], out, rtol=1e-5, atol=1e-5)
    m.eval(); m2.load_state_dict(m.state_dict()); m2.eval()
    out3 = M.batched_forward(m, flats, x)
    torch.testing.assert_close(out3[0], m2(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("x_batched", [False, True])
def test_batched_forward_equals_loop(x_batched):
    m = M.get_model("convnet", 3, 10, 32, width=8, seed=0)
    K = 3
    flats = torch.stack([M.flat_params(M.get_model("convnet", 3, 10, 32, width=8, seed=s)).detach() for s in range(K)])
    x = torch.randn(K, 5, 3, 32, 32) if x_batched else torch.randn(5, 3, 32, 32)
    out = M.batched_forward(m, flats, x)
    assert out.shape == (K, 5, 10)
    for k in range(K):
        xk = x[k] if x_batched else x
        torch.testing.assert_close(out[k], M.functional_forward(m, flats[k], xk), rtol=1e-4, atol=1e-5)
    emb = M.batched_forward(m, flats, x, output="embed")
    assert emb.shape == (K, 5, m.feature_dim)
    with pytest.raises(ValueError, match="first dimension"):
        M.batched_forward(m, flats, torch.randn(K + 1, 5, 3, 32, 32))


def test_batched_forward_gradients_match_loop():
    # float64: the vmapped (grouped) convolutions sum in another order than the loop's; in float32 the gradients of
    # near-zero entries differ by ~1e-6 relative to the largest one, so the comparison is made where rounding is
    # negligible and the tolerance can stay tight
    m = M.get_model("convnet", 1, 4, 8, width=3, depth=2, seed=0).double()
    flats = torch.stack([M.flat_params(M.get_model("convnet", 1, 4, 8, width=3, depth=2, seed=s)).detach()
                         for s in range(2)]).double().requires_grad_()
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    M.batched_forward(m, flats, x).pow(2).sum().backward()
    for k in range(2):
        f = flats[k].detach().clone().requires_grad_()
        M.functional_forward(m, f, x).pow(2).sum().backward()
        torch.testing.assert_close(flats.grad[k], f.grad, rtol=1e-9, atol=1e-12)


def test_double_backward_gradgradcheck():
    # float64 tiny nets: second derivatives w.r.t. (flat, x) against finite differences
    for kw in ({"norm": "instance", "act": "relu"}, {"norm": "none", "act": "softplus", "softplus_beta": 3.0}):
        m = M.get_model("convnet", 1, 3, 8, width=2, depth=2, seed=0, **kw).double()
        flat = M.flat_params(m).detach().clone().requires_grad_()
        x = torch.randn(2, 1, 8, 8, dtype=torch.float64, requires_grad=True)
        f = lambda fl, xx: M.functional_forward(m, fl, xx)
        assert torch.autograd.gradgradcheck(f, (flat, x), atol=1e-5, rtol=1e-3, fast_mode=True)


def test_trajectory_style_unroll_reaches_images():
    # MTT: theta_{i+1} = theta_i - lr * grad(loss); loss on final theta backpropagates to images and lr
    m = M.get_model("convnet", 1, 3, 8, width=4, depth=2, seed=0)
    theta = M.flat_params(m).detach()
    x = torch.randn(6, 1, 8, 8, requires_grad=True)
    lr = torch.tensor(0.01, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    t = theta.clone().requires_grad_()
    cur = t
    for _ in range(3):
        loss = nn.functional.cross_entropy(M.functional_forward(m, cur, x), y)
        g, = torch.autograd.grad(loss, cur, create_graph=True)
        cur = cur - lr * g
    (cur - theta).pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and lr.grad.abs() > 0


def test_features_helper():
    m = M.get_model("convnet", 3, 10, 32, width=8)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(M.features(m, x), m.embed(x))


@pytest.mark.parametrize("kw", [{"norm": "instance", "act": "relu"}, {"norm": "instance", "act": "softplus"},
                                {"norm": "none", "act": "softplus", "softplus_beta": 5.0},
                                {"norm": "instance", "pool": "none", "depth": 2}])
def test_fused_convnet_equals_the_plain_modules(kw):
    """The fused block (InstanceNormActPool / ActPool) keeps the plain ConvNet's parameters, names and flat layout,
    and computes the same function and gradients (float64, exact maths: only rounding differs)."""
    args = dict(width=4, depth=3, im_size=(16, 16), seed=0)
    args.update(kw)
    fused = M.get_model("convnet", 2, 5, fused=True, **{k: v for k, v in args.items() if k != "im_size"},
                        im_size=args["im_size"]).double()
    plain = M.get_model("convnet", 2, 5, fused=False, **{k: v for k, v in args.items() if k != "im_size"},
                        im_size=args["im_size"]).double()
    assert fused.fused and not plain.fused
    assert list(fused.state_dict()) == list(plain.state_dict())
    assert torch.equal(M.flat_params(fused), M.flat_params(plain))
    assert any(isinstance(m, (M.InstanceNormActPool, M.ActPool)) for m in fused.modules())
    x = torch.randn(3, 2, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4), requires_grad=True)
    outs = []
    for m in (fused, plain):
        flat = M.flat_params(m).detach().clone().requires_grad_(True)
        y = M.functional_forward(m, flat, x)
        g = torch.autograd.grad(y.square().sum(), [flat, x], create_graph=True)
        gg = torch.autograd.grad(g[0].square().sum() + g[1].square().sum(), [flat, x])
        outs.append([y, *g, *gg])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
