"""Tests of ddfast.distill.rcig (RCIG, Loo et al. ICML 2023) and its linearisation helper.

Independent references: finite differences of the network (float64), dense Jacobians, torch.linalg solves of
the KRR systems and of the Hessian, torch.autograd.functional.hessian of the reference's inner loss (2), and a
finite-difference derivative of the outer loss at the exact inner optimum. Tiny networks on scikit-learn's
8x8 digits keep the file fast.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from ddfast.data import load_dataset
from ddfast.distill import make_config, make_distiller
from ddfast.distill.base import SyntheticSet, TrainSet
from ddfast.distill._linearize import LinearizedNet, rcig_tangent_names
from ddfast.distill.rcig import (RCIG, AdaBelief, InnerProblem, RCIGConfig, adam_minimize, conjugate_gradient,
                                 lecun_normal_init, meta_step, preset_config)
from ddfast.models import convnet_rcig
from ddfast.ops.krr import krr_factor, krr_predict, krr_solve



@pytest.fixture(scope="module")
def digits():
    tr = load_dataset("digits")
    te = load_dataset("digits", split="test")
    return tr, te


def _train_set(tr, **kw):
    return TrainSet(tr.images, tr.labels, 10, tr.mean, tr.std, name="digits", **kw)


def _tiny_net(beta=60.0, width=1, dtype=torch.float64, seed=0, fused=None):
    m = convnet_rcig(1, 10, im_size=(8, 8), act="softplus", softplus_beta=beta, base_width=width,
                     fused=fused).to(dtype)
    g = torch.Generator().manual_seed(seed)
    flat = lecun_normal_init(m, g, dtype=dtype)
    from ddfast.models import unflatten
    params = {k: v.clone() for k, v in unflatten(m, flat).items()}
    # non-zero biases so that every tangent direction matters
    for k in params:
        if k.endswith("bias"):
            params[k] = 0.1 * torch.randn(params[k].shape, generator=g, dtype=dtype)
    return m, params


def _tiny_tiny_fast_config(**kw):
    base = dict(ipc=1, iterations=4, base_width=4, pool_model_count=3, max_online_steps=5, n_max_steps_pool=4,
                real_batch_size=64, n_inner_steps=3, n_hinv_steps=3, checkpoint_every=2, eval_steps=50,
                eval_warmup_steps=10, eval_runs=1)
    base.update(kw)
    return RCIGConfig(**base)


# ----------------------------------------------------------------------------------------------------------
# the KRR path
# ----------------------------------------------------------------------------------------------------------
def test_krr_factor_reuse_matches_linalg_float64():
    g = torch.Generator().manual_seed(1)
    n, p, C, m, lam = 12, 30, 4, 7, 0.3
    phi_s = torch.randn(n, p, generator=g, dtype=torch.float64, requires_grad=True)
    phi_t = torch.randn(m, p, generator=g, dtype=torch.float64)
    rhs = [torch.randn(n, C, generator=g, dtype=torch.float64) for _ in range(3)]
    fac = krr_factor(phi_s, lam)
    A = phi_s @ phi_s.T + lam * torch.eye(n, dtype=torch.float64)
    for r in rhs:  # many solves, one factorisation
        torch.testing.assert_close(krr_solve(fac, r), torch.linalg.solve(A, r), rtol=1e-10, atol=1e-12)
    pred = krr_predict(fac, rhs[0], phi_t)
    ref = phi_t @ phi_s.T @ torch.linalg.solve(A, rhs[0])
    torch.testing.assert_close(pred, ref, rtol=1e-10, atol=1e-12)
    # gradients w.r.t. the support features through the reused factor equal those of a fresh linalg solve
    w = torch.randn(m, C, generator=g, dtype=torch.float64)
    (g1,) = torch.autograd.grad((pred * w).sum() + (krr_solve(fac, rhs[1]) ** 2).sum(), phi_s)
    phi2 = phi_s.detach().clone().requires_grad_(True)
    A2 = phi2 @ phi2.T + lam * torch.eye(n, dtype=torch.float64)
    ref2 = (phi_t @ phi2.T @ torch.linalg.solve(A2, rhs[0]) * w).sum() + (torch.linalg.solve(A2, rhs[1]) ** 2).sum()
    (g2,) = torch.autograd.grad(ref2, phi2)
    torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-11)


def test_inner_problem_matches_reference_loss_and_hessian(digits):
    """(2') and (3) against the reference's inner loss (2) written out with K alpha, differentiated by autograd."""
    tr, _ = digits
    m, params = _tiny_net()
    lin = LinearizedNet(m, params)
    x = tr.images[:6].double()
    y = torch.randn(6, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    lam = 0.05
    prob = InnerProblem(lin, x, y, lam, torch.float64)
    J = lin.jacobian(prob.cache_d)  # [n*C, P]
    phi = prob.cache_d.features
    K = phi @ phi.T

    def ref_loss(psi):  # RCIG's get_krr_loss_gd (self_loss=True), verbatim maths
        u = (J @ psi).view(6, 10)
        a = torch.linalg.solve(K + lam * torch.eye(6, dtype=torch.float64), y - u)
        err = y - (u + K @ a)
        val = 0.5 * (err ** 2).sum() + 0.5 * lam * (torch.trace(a.T @ K @ a) + psi @ psi)
        return val / (6 * 10)

    psi = 0.01 * torch.randn(lin.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    val, grad = prob.value_and_grad(psi)
    psi_r = psi.clone().requires_grad_(True)
    ref = ref_loss(psi_r)
    (gref,) = torch.autograd.grad(ref, psi_r)
    torch.testing.assert_close(val, ref.detach(), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(grad, gref, rtol=1e-8, atol=1e-14)
    H = torch.autograd.functional.hessian(ref_loss, psi)
    v = torch.randn(lin.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(prob.hvp(v), H @ v, rtol=1e-8, atol=1e-14)
    assert torch.linalg.eigvalsh(H).min() >= prob.c * (1 - 1e-8)  # SPD, eigenvalues >= c


# ----------------------------------------------------------------------------------------------------------
# the linearisation
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("method", ["convnet", "functorch"])
def test_linearisation_matches_finite_differences(digits, method, fused):
    """jvp against central differences of the network, and jvp / vjp against the explicit Jacobian, for the fused
    activation + pooling blocks (the compiled kernels' derivatives) and the plain modules."""
    from torch.func import functional_call

    tr, _ = digits
    m, params = _tiny_net(fused=fused)
    lin = LinearizedNet(m, params, method=method)
    assert lin.method == method
    if method == "convnet":
        assert any(op[0] == "actpool" for op in lin._ops) == fused
    assert "classifier.weight" not in lin.tangent_names and "classifier.bias" in lin.tangent_names
    assert lin.tangent_names == rcig_tangent_names(m)
    x = tr.images[:5].double()
    cache = lin.forward(x)
    torch.testing.assert_close(cache.features, functional_call(m, params, (x,), {"output": "embed"}))
    g = torch.Generator().manual_seed(7)
    psi = torch.randn(lin.numel, dtype=torch.float64, generator=g)
    u = lin.jvp(cache, psi)
    eps = 1e-6
    q = lin.split(psi)
    plus = {k: v + eps * q[k] if k in q else v for k, v in params.items()}
    minus = {k: v - eps * q[k] if k in q else v for k, v in params.items()}
    fd = (functional_call(m, plus, (x,)) - functional_call(m, minus, (x,))) / (2 * eps)
    torch.testing.assert_close(u, fd, rtol=1e-6, atol=1e-8)
    # explicit J psi and the transpose
    J = lin.jacobian(cache)
    torch.testing.assert_close(J @ psi, u.reshape(-1), rtol=1e-10, atol=1e-12)
    w = torch.randn(5, 10, dtype=torch.float64, generator=g)
    torch.testing.assert_close(lin.vjp(cache, w), J.T @ w.reshape(-1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fused", [True, False])
def test_linearisation_methods_agree_and_differentiate_through_inputs(digits, fused):
    tr, _ = digits
    m, params = _tiny_net(fused=fused)
    x = tr.images[:4].double().requires_grad_(True)
    psi = torch.randn(LinearizedNet(m, params).numel, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    outs = []
    for method in ("convnet", "functorch"):
        lin = LinearizedNet(m, params, method=method)
        c = lin.forward(x)
        u = lin.jvp(c, psi)
        s = (u ** 2).sum() + (c.features ** 3).sum()
        (gx,) = torch.autograd.grad(s, x)
        outs.append((u.detach(), gx))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-8, atol=1e-10)


# ----------------------------------------------------------------------------------------------------------
# H^-1 g and the implicit gradient
# ----------------------------------------------------------------------------------------------------------
def test_cg_hinv_matches_dense_solve(digits):
    tr, _ = digits
    m, params = _tiny_net()
    lin = LinearizedNet(m, params)
    x = tr.images[:8].double()
    y = F.one_hot(tr.labels[:8], 10).double() - 0.1
    prob = InnerProblem(lin, x, y, 0.04, torch.float64)
    J = lin.jacobian(prob.cache_d)
    phi = prob.cache_d.features
    A = phi @ phi.T + 0.04 * torch.eye(8, dtype=torch.float64)
    Ainv = torch.kron(torch.linalg.inv(A).contiguous(), torch.eye(10, dtype=torch.float64))  # acts on row-major [n, C]
    H = prob.c * (torch.eye(lin.numel, dtype=torch.float64) + J.T @ Ainv @ J)
    gvec = torch.randn(lin.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    dense = torch.linalg.solve(H, gvec)
    v, res, objs = conjugate_gradient(prob.hvp, gvec, max_iter=lin.numel, rtol=1e-12)
    torch.testing.assert_close(v, dense, rtol=1e-7, atol=1e-9 * float(dense.abs().max()))
    assert res[-1] <= 1e-10 * float(gvec.norm())
    # the objective 1/2 v'Hv - g'v decreases monotonically along CG and reaches the optimum
    assert all(a >= b - 1e-12 * abs(b) for a, b in zip(objs, objs[1:]))
    assert objs[-1] == pytest.approx(float(-0.5 * gvec @ dense), rel=1e-8)
    # a few CG steps beat the same number of (well-tuned) Adam steps on the same quadratic
    v5, _, _ = conjugate_gradient(prob.hvp, gvec, max_iter=5)
    errs = []
    for lr in (1e-3, 1e-2, 1e-1, 1.0):
        va, _ = adam_minimize(lambda z: (0.5 * z @ prob.hvp(z) - gvec @ z, prob.hvp(z) - gvec),
                              torch.zeros_like(gvec), lr, 5)
        errs.append(float(((va - dense) @ H @ (va - dense))))
    assert float(((v5 - dense) @ H @ (v5 - dense))) < min(errs)


def _outer_loss_exact(m, params, images, labels, log_temp, real_x, real_y, lam):
    """L_out(S, psi*(S)) with psi* from a dense solve; independent path: functorch jvp + torch.linalg."""
    lin = LinearizedNet(m, params, method="functorch")
    cs = lin.forward(images)
    n, C = labels.shape
    J = torch.stack([lin.jvp(cs, e).reshape(-1) for e in torch.eye(lin.numel, dtype=images.dtype)], 1)
    A = cs.features @ cs.features.T + lam * torch.eye(n, dtype=images.dtype)
    c = lam / (n * C)
    Ainv = torch.kron(torch.linalg.inv(A).contiguous(), torch.eye(C, dtype=images.dtype))
    H = c * (torch.eye(lin.numel, dtype=images.dtype) + J.T @ Ainv @ J)
    psi = torch.linalg.solve(H, c * J.T @ (Ainv @ labels.reshape(-1)))
    ct = lin.forward(real_x)
    u_t = lin.jvp(ct, psi)
    u_s = (J @ psi).view(n, C)
    pred = u_t + ct.features @ cs.features.T @ torch.linalg.solve(A, labels - u_s)
    top = labels.topk(2, dim=1).values
    marg = torch.clamp(top[:, 0] - top[:, 1], max=1 / (2 * C)).mean()
    return F.cross_entropy(pred * log_temp.exp(), real_y) - marg


def test_implicit_gradient_matches_finite_differences(digits):
    """direct + implicit (unclipped, exact inner solve) = d/dS L_out(S, psi*(S)) by central differences."""
    tr, _ = digits
    m, params = _tiny_net(beta=60.0)
    gen = torch.Generator().manual_seed(5)
    images = tr.images[:5].double() + 0.05 * torch.randn(5, 1, 8, 8, generator=gen, dtype=torch.float64)
    labels = F.one_hot(tr.labels[:5], 10).double() - 0.1 + 0.02 * torch.randn(5, 10, generator=gen, dtype=torch.float64)
    log_temp = torch.tensor(0.3, dtype=torch.float64)
    real_x, real_y = tr.images[100:140].double(), tr.labels[100:140]
    lam = 0.02
    P = LinearizedNet(m, params).numel
    res = meta_step(m, params, images, labels, log_temp, real_x, real_y, ridge=lam, n_inner_steps=P,
                    inner_solver="cg", n_hinv_steps=P, hinv_solver="cg", hinv_rtol=1e-13, clip_implicit=False,
                    krr_dtype=torch.float64)
    assert res.loss == pytest.approx(float(_outer_loss_exact(m, params, images, labels, log_temp, real_x, real_y,
                                                             lam)), rel=1e-8)
    assert float(res.implicit_images.norm()) > 0.05 * float(res.direct_images.norm())  # the implicit part matters
    eps = 1e-5
    for trial in range(2):
        dx = torch.randn(images.shape, generator=gen, dtype=torch.float64)
        dy = torch.randn(labels.shape, generator=gen, dtype=torch.float64)
        fp = _outer_loss_exact(m, params, images + eps * dx, labels + eps * dy, log_temp, real_x, real_y, lam)
        fm = _outer_loss_exact(m, params, images - eps * dx, labels - eps * dy, log_temp, real_x, real_y, lam)
        fd = float(fp - fm) / (2 * eps)
        an = float((res.grad_images * dx).sum() + (res.grad_labels * dy).sum())
        assert an == pytest.approx(fd, rel=2e-5, abs=1e-9)
        # the direct gradient alone is not the total derivative
        direct = float((res.direct_images * dx).sum() + (res.direct_labels * dy).sum())
        assert abs(direct - fd) > 1e-4 * abs(fd)
    # temperature: only a direct path
    ft = _outer_loss_exact(m, params, images, labels, log_temp + eps, real_x, real_y, lam)
    fb = _outer_loss_exact(m, params, images, labels, log_temp - eps, real_x, real_y, lam)
    assert float(res.grad_log_temp) == pytest.approx(float(ft - fb) / (2 * eps), rel=1e-5)


def test_one_factorisation_per_outer_step(digits, monkeypatch):
    """K + lambda I is factorised once per meta-step; every inner / HVP / outer / implicit solve reuses it."""
    import ddfast.distill.rcig as rcig_mod

    tr, _ = digits
    m, params = _tiny_net(dtype=torch.float32)
    calls = {"factor": 0, "solve": 0, "predict": 0}

    def counting(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(rcig_mod, "krr_factor", counting("factor", rcig_mod.krr_factor))
    monkeypatch.setattr(rcig_mod, "krr_solve", counting("solve", rcig_mod.krr_solve))
    monkeypatch.setattr(rcig_mod, "krr_predict", counting("predict", rcig_mod.krr_predict))
    images = tr.images[:10].clone()
    labels = F.one_hot(tr.labels[:10], 10).float() - 0.1
    meta_step(m, params, images, labels, torch.zeros(()), tr.images[200:264], tr.labels[200:264], ridge=0.05,
              n_inner_steps=5, inner_solver="adam", inner_lr=1e-3, n_hinv_steps=4, hinv_solver="cg")
    assert calls["factor"] == 1
    assert calls["solve"] == 5 + 4 + 1 and calls["predict"] == 1  # inner steps, HVPs, implicit pass


def test_clipping_and_extra_loss(digits):
    tr, _ = digits
    m, params = _tiny_net(dtype=torch.float32)
    images = tr.images[:10].clone()
    labels = F.one_hot(tr.labels[:10], 10).float() - 0.1
    kw = dict(ridge=0.05, n_inner_steps=4, inner_solver="cg", n_hinv_steps=4)
    t0 = torch.zeros(())
    a = meta_step(m, params, images, labels, t0, tr.images[200:264], tr.labels[200:264], **kw)
    for i, d in ((a.implicit_images, a.direct_images), (a.implicit_labels, a.direct_labels)):
        clipped = i * min(1.0, float(d.norm()) / float(i.norm()))
        assert float(clipped.norm()) <= float(d.norm()) * (1 + 1e-6)
    torch.testing.assert_close(a.grad_images, a.direct_images + a.implicit_images *
                               min(1.0, float(a.direct_images.norm() / a.implicit_images.norm())))
    b = meta_step(m, params, images, labels, t0, tr.images[200:264], tr.labels[200:264],
                  extra_loss=lambda x, y: 3.0 * (x ** 2).sum() + (y ** 2).sum(), **kw)
    torch.testing.assert_close(b.grad_images, a.grad_images + 6.0 * images, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.grad_labels, a.grad_labels + 2.0 * labels, rtol=1e-5, atol=1e-6)
    assert b.extra_loss == pytest.approx(float(3 * (images ** 2).sum() + (labels ** 2).sum()), rel=1e-5)


def test_adabelief_matches_formula():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(5, dtype=torch.float64, generator=g)
    q = p.clone().requires_grad_(True)
    opt = AdaBelief([q], lr=0.01)
    m = torch.zeros(5, dtype=torch.float64)
    s = torch.zeros(5, dtype=torch.float64)
    for t in range(1, 5):
        grad = torch.randn(5, dtype=torch.float64, generator=g)
        q.grad = grad.clone()
        opt.step()
        m = 0.9 * m + 0.1 * grad
        s = 0.999 * s + 0.001 * (grad - m) ** 2 + 1e-16
        p = p - 0.01 * (m / (1 - 0.9 ** t)) / ((s / (1 - 0.999 ** t)).sqrt() + 1e-16)
        torch.testing.assert_close(q.detach(), p, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------------------------------------
# the distiller
# ----------------------------------------------------------------------------------------------------------
def test_config_validation_and_presets():
    with pytest.raises(ValueError, match="l2_rate"):
        RCIGConfig(l2_rate=-1.0).validate()
    with pytest.raises(ValueError, match="hinv_solver"):
        RCIGConfig(hinv_solver="neumann").validate()
    with pytest.raises(ValueError, match="n_max_steps_pool"):
        RCIGConfig(n_max_steps_pool=1).validate()
    with pytest.raises(ValueError, match="ema_decay"):
        RCIG(RCIGConfig(ema_decay=1.0))
    with pytest.raises(TypeError):
        RCIG(object())
    with pytest.raises(ValueError, match="dataset"):
        preset_config("full", "svhn", 10)
    with pytest.raises(ValueError, match="unknown option"):
        preset_config("quick", "fashion-mnist", 10, not_a_field=1)
    full = make_config("rcig", "full", "cifar10", 10)
    assert (full.l2_rate, full.n_inner_steps, full.n_hinv_steps, full.proto_lr, full.temp_lr) == (5e-4, 20, 20, 3e-3, 3e-2)
    assert (full.pool_model_count, full.max_online_steps, full.n_max_steps_pool, full.real_batch_size) == (30, 100, 16, 1024)
    assert full.use_flip is True and full.softplus_beta == 60.0 and full.base_width == 128 and full.zca is True
    fm = preset_config("full", "fashion_mnist", 10)
    assert fm.use_flip is False and fm.zca is False
    assert preset_config("full", "cifar100", 50).use_flip is False
    q = preset_config("quick", "fashion-mnist", 10, iterations=7)
    assert q.iterations == 7 and q.base_width < 128


def test_resume_equals_uninterrupted(digits, tmp_path):
    tr, _ = digits
    train = _train_set(tr)
    cfg = _tiny_tiny_fast_config(iterations=6, checkpoint_every=3, inner_solver="adam", lr_adapt_every=2,
                                 max_online_steps=4)
    full = RCIG(cfg, quiet=True)
    syn_a = full.run(train)
    d = str(tmp_path / "ck")
    part = RCIG(cfg, quiet=True)
    part.run(train, checkpoint_dir=d, until=3)
    assert part.iteration == 3 and os.path.exists(os.path.join(d, "checkpoint.pt"))
    resumed = RCIG(cfg, quiet=True)
    syn_b = resumed.run(train, checkpoint_dir=d)
    assert resumed.iteration == 6
    assert torch.equal(syn_a.images, syn_b.images) and torch.equal(syn_a.labels, syn_b.labels)
    for name in ("pool_params", "pool_m", "pool_v", "pool_t", "pool_it"):
        assert torch.equal(getattr(full, name), getattr(resumed, name)), name
    assert int(full.pool_t.sum()) > 0  # the pool did train
    assert sum(h["pool_steps"] for h in full.history) > int(full.pool_it.sum())  # ... and re-initialised a model
    assert full.inner_lr == resumed.inner_lr and full.history == resumed.history
    assert torch.equal(full.images, resumed.images) and torch.equal(full.log_temp, resumed.log_temp)


def test_pool_reinitialises_and_trains(digits):
    tr, _ = digits
    cfg = _tiny_tiny_fast_config(iterations=8, pool_model_count=1, max_online_steps=3, n_max_steps_pool=3,
                                 inner_solver="cg")
    r = RCIG(cfg, quiet=True)
    r.prepare(_train_set(tr))
    r.initialize(_train_set(tr))
    p0 = r.pool_params[0].clone()
    seen_reset = False
    for _ in range(cfg.iterations):
        r.step()
        r.iteration += 1
        assert int(r.pool_it[0]) < cfg.max_online_steps
        seen_reset |= int(r.pool_it[0]) == 0
    assert seen_reset and not torch.equal(p0, r.pool_params[0])


def test_trust_fields_are_respected(digits):
    tr, _ = digits
    n = tr.images.shape[0]
    trusted = torch.zeros(n, dtype=torch.bool)
    trusted[: n // 2] = True
    repl = torch.full((n,), -1, dtype=torch.int64)
    repl[:50] = (tr.labels[:50] + 1) % 10  # pseudo-labels of recalled samples
    images = tr.images.clone()
    images[~trusted] = float("nan")  # any use of an untrusted image would surface as a NaN / error
    train = TrainSet(images, tr.labels, 10, tr.mean, tr.std, name="digits", trusted_mask=trusted,
                     replacement_labels=repl)
    cfg = _tiny_tiny_fast_config(iterations=3, real_batch_size=10_000, inner_solver="cg")
    r = RCIG(cfg, quiet=True)
    syn = r.run(train)
    assert torch.isfinite(syn.images).all() and all(math.isfinite(h["loss"]) for h in r.history)
    x, y = r._real_batch()
    assert x.shape[0] == int(trusted.sum())  # the whole trusted set, nothing else
    ref = r.transform(tr.images[: n // 2]).reshape(n // 2, -1)
    match = torch.cdist(x.reshape(x.shape[0], -1), ref).argmin(1)
    torch.testing.assert_close(x.reshape(x.shape[0], -1), ref[match])
    assert torch.equal(y, train.effective_labels()[match])
    # a new trusted view (TAD round): batches now come from it only
    trusted2 = torch.zeros(n, dtype=torch.bool)
    trusted2[:100] = True
    r.update_train(TrainSet(images, tr.labels, 10, tr.mean, tr.std, name="digits", trusted_mask=trusted2))
    x2, y2 = r._real_batch()
    assert x2.shape[0] == 100 and torch.isfinite(x2).all()
    assert sorted(y2.tolist()) == sorted(tr.labels[:100].tolist())
    # soft labels (TAD's posterior distribution): the batch's targets are their rows, as float
    soft = torch.softmax(torch.randn(n, 10, generator=torch.Generator().manual_seed(3)), 1)
    r.update_train(TrainSet(tr.images, tr.labels, 10, tr.mean, tr.std, name="digits", soft_labels=soft))
    x3, y3 = r._real_batch()
    ref3 = r.transform(tr.images).reshape(n, -1)
    match3 = torch.cdist(x3.reshape(x3.shape[0], -1), ref3).argmin(1)
    assert y3.dtype == torch.float32 and torch.equal(y3, soft[match3])


def test_trainset_soft_labels_are_checked(digits):
    tr, _ = digits
    n = tr.labels.numel()
    good = torch.full((n, 10), 0.1)
    assert _train_set(tr, soft_labels=good).subset(torch.arange(5)).soft_labels.shape == (5, 10)
    for bad, what in ((torch.full((n, 9), 1 / 9), "float"), (torch.ones(n, 10, dtype=torch.int64), "float"),
                      (torch.full((n, 10), 0.2), "distributions"),
                      (torch.where(torch.arange(10) == 0, float("nan"), 0.1).expand(n, 10), "distributions")):
        with pytest.raises(ValueError, match=what):
            _train_set(tr, soft_labels=bad)


def test_outer_loss_goes_down_and_beats_initialisation(digits, tmp_path):
    from ddfast.evaluate import EvalConfig, evaluate_synset

    tr, te = digits
    train = _train_set(tr)
    cfg = RCIGConfig(ipc=1, iterations=60, base_width=8, pool_model_count=4, max_online_steps=30,
                     real_batch_size=512, n_inner_steps=5, inner_solver="cg", n_hinv_steps=5, proto_lr=0.01,
                     eval_steps=300, eval_warmup_steps=50, eval_lr=1e-3, eval_runs=3)
    r = make_distiller("rcig", cfg, quiet=True)
    r.prepare(train)
    r.initialize(train)
    syn0 = r.synthetic_set()
    syn = r.run(train, initialize=False)
    losses = [h["loss"] for h in r.history]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10
    # a saved set round-trips and evaluates on held-out digits better than its own initialisation
    syn.save(str(tmp_path / "s"))
    syn = SyntheticSet.load(str(tmp_path / "s"))
    assert syn.labels.dtype == torch.float32 and syn.labels.shape == (10, 10) and syn.method == "rcig"
    ec = EvalConfig(**syn.eval_config)
    assert ec.loss == "mse" and ec.optimizer == "adam" and ec.schedule == "cosine"
    tf = syn.input_transform()
    torch.testing.assert_close(tf(te.images[:5]), r.transform(te.images[:5]))
    acc = evaluate_synset(syn.images, syn.labels, te, config=ec, transform=tf, images_transformed=True)
    acc0 = evaluate_synset(syn0.images, syn0.labels, te, config=ec, transform=tf, images_transformed=True)
    print(f"RCIG digits IPC1: distilled {acc}, initialisation {acc0}")
    assert acc.mean > acc0.mean + 3.0, (acc, acc0)


def test_soft_real_targets_are_the_mixture_of_their_hard_targets(digits):
    """Soft targets of the outer cross-entropy (TAD's posterior distribution, ``divert_real="posterior_soft"``):
    a one-hot distribution gives exactly the hard label's loss and meta-gradient, and, with exact inner and
    Hessian-inverse solves and no clipping, the loss and meta-gradient of ``a e_y1 + (1 - a) e_y2`` are the same
    mixture of those of y1 and y2 (the cross-entropy is linear in its target; so are g_psi and H^-1 g_psi)."""
    tr, _ = digits
    m, params = _tiny_net(beta=60.0)
    gen = torch.Generator().manual_seed(7)
    images = tr.images[:5].double() + 0.05 * torch.randn(5, 1, 8, 8, generator=gen, dtype=torch.float64)
    labels = F.one_hot(tr.labels[:5], 10).double() - 0.1
    log_temp = torch.tensor(0.2, dtype=torch.float64)
    real_x, y1 = tr.images[100:140].double(), tr.labels[100:140]
    y2 = (y1 + 1 + torch.randint(0, 9, y1.shape, generator=gen)) % 10
    P = LinearizedNet(m, params).numel
    kw = dict(ridge=0.02, n_inner_steps=P, inner_solver="cg", n_hinv_steps=P, hinv_solver="cg", hinv_rtol=1e-13,
              clip_implicit=False, krr_dtype=torch.float64)
    run = lambda y: meta_step(m, params, images, labels, log_temp, real_x, y, **kw)  # noqa: E731
    r1, r2 = run(y1), run(y2)
    one_hot = run(F.one_hot(y1, 10).double())
    assert one_hot.loss == pytest.approx(r1.loss, rel=1e-12) and one_hot.acc == r1.acc
    for name in ("grad_images", "grad_labels", "grad_log_temp"):
        torch.testing.assert_close(getattr(one_hot, name), getattr(r1, name), rtol=1e-10, atol=1e-12)
    a = 0.3
    mix = run(a * F.one_hot(y1, 10).double() + (1 - a) * F.one_hot(y2, 10).double())
    assert mix.loss == pytest.approx(a * r1.loss + (1 - a) * r2.loss, rel=1e-10)
    for name in ("grad_images", "grad_labels", "grad_log_temp"):
        want = a * getattr(r1, name) + (1 - a) * getattr(r2, name)
        torch.testing.assert_close(getattr(mix, name), want, rtol=1e-7, atol=1e-9)
    with pytest.raises(ValueError, match="real_y"):
        run(torch.full((40, 9), 1 / 9, dtype=torch.float64))
