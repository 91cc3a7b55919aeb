"""Per-sample trust-scoring ops (TAD): sample_stats, classwise_gmm, anchor_distances.

Every op is checked against an independent truth -- float64 log_softmax formulas, scikit-learn's
GaussianMixture fitted per class from the same initialisation, explicit float64 loops -- on the compiled
kernel (CPU always, CUDA when a GPU is present) and on the pure-PyTorch reference; plus opcheck,
torch.compile(fullgraph=True), the DDFAST_DISABLE_EXTENSION fallback and every error case.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import ddfast.ops as ops
from ddfast import _extension
from ddfast.ops import trust as trust_mod
from ddfast.ops._reference import trust as ref

from _helpers import ALL_FLOAT_DTYPES, DEVICES, FLOAT_DTYPES, HAS_CUDA, gen, tol

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_kernels = pytest.mark.skipif(not trust_mod._KERNELS, reason="ddfast._C (trust kernels) not built")


def _raw(name):
    return getattr(torch.ops.ddfast, name).default


# ==================================================================================================
# sample_stats
# ==================================================================================================
def expected_stats(z: torch.Tensor, y: torch.Tensor):
    """float64 truth from log_softmax: (loss, confidence, margin, prediction)."""
    z = z.detach().to("cpu", torch.float64)
    y = y.to("cpu").long()
    logp = torch.log_softmax(z, dim=1)
    loss = -logp.gather(1, y[:, None])[:, 0]
    p = logp.exp()
    conf = p.gather(1, y[:, None])[:, 0]
    if z.shape[1] > 1:
        other = p.scatter(1, y[:, None], -1.0).amax(dim=1)
    else:
        other = torch.zeros_like(conf)  # no other class: probability 0
    return loss, conf, conf - other, z.argmax(dim=1)


def assert_stats(out, exp, dtype):
    t = tol(torch.float64 if dtype == torch.float64 else torch.float32, 5.0)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for name, a, b in zip(("loss", "confidence", "margin"), out[:3], exp[:3]):
        assert a.dtype == acc, name
        torch.testing.assert_close(a.cpu().double(), b, **t, msg=lambda m: f"{name}: {m}")
    assert out.prediction.dtype == torch.int64
    assert torch.equal(out.prediction.cpu(), exp[3])


def make_logits(n, c, dtype, device, seed=0, scale=3.0):
    z = torch.randn(n, c, generator=gen(seed), dtype=torch.float64) * scale
    return z.to(dtype).to(device), torch.randint(0, c, (n,), generator=gen(seed + 1)).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (1, 2), (5, 2), (37, 10), (33, 48), (20, 49), (9, 1000), (3, 4099)])
def test_sample_stats_matches_float64(device, dtype, shape):
    z, y = make_logits(*shape, dtype, device, seed=shape[0] + shape[1])
    out = ops.sample_stats(z, y)
    assert isinstance(out, ops.SampleStats)
    assert_stats(out, expected_stats(z, y), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_sample_stats_reference_matches_float64(device):
    for dtype in ALL_FLOAT_DTYPES:
        z, y = make_logits(40, 13, dtype, device)
        assert_stats(ops.SampleStats(*ref.sample_stats(z, y)), expected_stats(z, y), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("c", [7, 300])
def test_sample_stats_large_logits(device, c):
    z, y = make_logits(50, c, torch.float32, device, scale=1e4)
    out = ops.sample_stats(z, y)
    assert torch.isfinite(out.loss).all()
    exp = expected_stats(z, y)
    torch.testing.assert_close(out.loss.cpu().double(), exp[0], rtol=1e-6, atol=1e-2)
    torch.testing.assert_close(out.confidence.cpu().double(), exp[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(out.margin.cpu().double(), exp[2], rtol=0, atol=1e-6)
    assert torch.equal(out.prediction.cpu(), exp[3])


@pytest.mark.parametrize("device", DEVICES)
def test_sample_stats_ties_take_first_index(device):
    # narrow path (C <= 48) and wide path (C > 48); ties straddling SIMD lanes / warp lanes
    for c, pos in [(4, (1, 2)), (10, (0, 9)), (100, (17, 80)), (100, (33, 65)), (1000, (5, 999))]:
        z = torch.zeros(3, c)
        z[0, list(pos)] = 5.0
        z[1] = 2.0  # all equal
        z[2, pos[1]] = 7.0
        y = torch.tensor([pos[1], 0, 0])
        out = ops.sample_stats(z.to(device), y.to(device))
        assert out.prediction.tolist() == [pos[0], 0, pos[1]] == torch.argmax(z, 1).tolist()
        assert out.margin[0].item() == pytest.approx(0.0, abs=1e-7)  # tied with the best other class
        assert_stats(out, expected_stats(z, y), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_sample_stats_single_class_and_masked(device):
    out = ops.sample_stats(torch.tensor([[3.0], [-1e4]], device=device), torch.tensor([0, 0], device=device))
    assert out.loss.tolist() == [0.0, 0.0]
    assert out.confidence.tolist() == [1.0, 1.0]
    assert out.margin.tolist() == [1.0, 1.0]  # no other class: its probability is 0
    assert out.prediction.tolist() == [0, 0]
    inf = float("inf")
    z = torch.tensor([[-inf, 1.0, 2.0], [0.0, -inf, -inf], [1.0, -inf, 1.0]], device=device)
    y = torch.tensor([0, 0, 2], device=device)
    out = ops.sample_stats(z, y)
    assert out.loss[0].item() == inf and out.confidence[0].item() == 0.0
    assert out.loss[1].item() == 0.0 and out.margin[1].item() == 1.0
    assert out.margin[2].item() == pytest.approx(0.0, abs=1e-7)
    assert out.prediction.tolist() == [2, 0, 0]
    torch.testing.assert_close(out.margin[0].cpu().double(), torch.tensor(-1 / (1 + math.exp(-1)), dtype=torch.float64))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["rowstride", "step", "transpose"])
def test_sample_stats_noncontiguous(device, dtype, kind):
    base, _ = make_logits(24, 70, torch.float64, "cpu")
    if kind == "rowstride":
        z = torch.zeros(24, 80, dtype=dtype)[:, 5:75]
        z.copy_(base)
    elif kind == "step":
        z = torch.zeros(24, 140, dtype=dtype)[:, ::2]
        z.copy_(base)
    else:
        z = base.to(dtype).t().contiguous().t()
    assert not z.is_contiguous()
    y = torch.randint(0, 70, (48,), generator=gen(3))[::2]
    out = ops.sample_stats(z.to(device), y.to(device))
    assert_stats(out, expected_stats(z, y), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ema_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("momentum", [0.0, 0.3, 1.0])
def test_sample_stats_ema_in_place(device, ema_dtype, momentum):
    z, y = make_logits(30, 12, torch.float16, device)
    buf = torch.rand(60, generator=gen(5), dtype=ema_dtype).to(device)
    ema = buf[::2]  # strided, updated in place
    old = ema.clone()
    other = buf[1::2].clone()
    out = ops.sample_stats(z, y, ema=ema, momentum=momentum)
    exp = expected_stats(z, y)
    assert_stats(out, exp, torch.float16)
    want = momentum * old.cpu().double() + (1 - momentum) * exp[0]
    torch.testing.assert_close(ema.cpu().double(), want, **tol(torch.float32, 10.0))  # loss is float32 here
    assert torch.equal(buf[1::2], other)  # untouched interleaved elements


@pytest.mark.parametrize("device", DEVICES)
def test_sample_stats_ema_with_overlapping_memory_is_refused(device):
    """An expanded ema (every row the same element) would be written by every row: both paths refuse it, the
    compiled op too when called directly, and nothing is written."""
    z, y = make_logits(6, 4, torch.float32, device)
    one = torch.zeros(1, device=device)
    with pytest.raises(ValueError, match="overlapping memory"):
        ops.sample_stats(z, y, ema=one.expand(6))
    if _extension.use_kernel(z):
        with pytest.raises(ValueError, match="overlapping memory"):
            torch.ops.ddfast.sample_stats_ema_(z, y, one.expand(6), 0.9)
    assert float(one) == 0.0
    ops.sample_stats(z[:1], y[:1], ema=one.expand(1))  # one row: no overlap


@pytest.mark.parametrize("device", DEVICES)
def test_sample_stats_empty_and_int32_labels(device):
    out = ops.sample_stats(torch.empty(0, 5, device=device), torch.empty(0, dtype=torch.long, device=device))
    assert [t.shape for t in out] == [(0,)] * 4
    z, y = make_logits(6, 4, torch.float32, device)
    assert_stats(ops.sample_stats(z, y.int()), expected_stats(z, y), torch.float32)


def test_sample_stats_errors():
    z = torch.randn(4, 3)
    y = torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match="logits"):
        ops.sample_stats(z[0], y)
    with pytest.raises(TypeError, match="logits"):
        ops.sample_stats(z.long(), y)
    with pytest.raises(TypeError, match="labels"):
        ops.sample_stats(z, y.float())
    with pytest.raises(ValueError, match="labels"):
        ops.sample_stats(z, y[:3])
    with pytest.raises(ValueError, match="labels"):
        ops.sample_stats(z, y.to("meta"))
    for bad in (-1, 3):
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
            ops.sample_stats(z, torch.tensor([0, bad, 1, 1]))
    with pytest.raises(ValueError, match="at least one class"):
        ops.sample_stats(torch.empty(4, 0), y)
    for v in (float("nan"), float("inf")):
        zz = z.clone()
        zz[2, 1] = v
        with pytest.raises(ValueError, match=r"rows \[2\]"):
            ops.sample_stats(zz, y)
    with pytest.raises(ValueError, match="rows"):
        ops.sample_stats(torch.full((4, 3), float("-inf")), y)
    with pytest.raises(RuntimeError, match="not differentiable"):
        ops.sample_stats(z.clone().requires_grad_(), y)
    with torch.no_grad():
        ops.sample_stats(z.clone().requires_grad_(), y)
    with pytest.raises(TypeError, match="ema"):
        ops.sample_stats(z, y, ema=torch.zeros(4, dtype=torch.float16))
    with pytest.raises(ValueError, match="ema"):
        ops.sample_stats(z, y, ema=torch.zeros(5))
    with pytest.raises(ValueError, match="momentum"):
        ops.sample_stats(z, y, ema=torch.zeros(4), momentum=1.5)
    with pytest.raises(TypeError, match="momentum"):
        ops.sample_stats(z, y, ema=torch.zeros(4), momentum="0.9")


@needs_kernels
def test_sample_stats_kernel_checks_labels_itself():
    # the raw CPU op raises on labels out of range even without the wrapper (e.g. under torch.compile)
    with pytest.raises(ValueError, match="labels"):
        torch.ops.ddfast.sample_stats(torch.randn(3, 4), torch.tensor([0, 4, 1]))
    with pytest.raises(ValueError, match="labels"):
        torch.ops.ddfast.sample_stats(torch.randn(40, 100), torch.full((40,), -1))


@needs_kernels
@pytest.mark.parametrize("device", DEVICES)
def test_sample_stats_opcheck(device):
    for dtype, c in [(torch.float32, 10), (torch.float64, 100), (torch.bfloat16, 3)]:
        z, y = make_logits(17, c, dtype, device)
        torch.library.opcheck(_raw("sample_stats"), (z, y))
        ema = torch.rand(17, device=device)
        # test_schema fails if the kernel mutates an argument that the schema does not mark Tensor(a!) (logits,
        # labels), test_aot_dispatch_dynamic that the functionalised graph reproduces the mutation of ema
        torch.library.opcheck(_raw("sample_stats_ema_"), (z, y, ema, 0.7))
        old = ema.clone()
        out = _raw("sample_stats_ema_")(z, y, ema, 0.7)
        torch.testing.assert_close(ema, (0.7 * old + 0.3 * out[0]).float(), rtol=1e-6, atol=1e-6)


# ==================================================================================================
# classwise_gmm
# ==================================================================================================
def bimodal(n_per_class, seed, *, sep=3.0, frac_high=0.3, sd=(0.3, 0.5)):
    g = gen(seed)
    vals, labs = [], []
    for c, n in enumerate(n_per_class):
        hi = torch.rand(n, generator=g) < frac_high
        x = torch.where(hi, sep + sd[1] * torch.randn(n, generator=g, dtype=torch.float64),
                        sd[0] * torch.randn(n, generator=g, dtype=torch.float64))
        vals.append(x + 0.1 * c)
        labs.append(torch.full((n,), c, dtype=torch.long))
    perm = torch.randperm(sum(n_per_class), generator=g)
    return torch.cat(vals)[perm], torch.cat(labs)[perm]


def sklearn_fit(x, w0, mu0, var0, *, cov_type, tol, reg_covar, max_iter):
    """scikit-learn GaussianMixture on one class from the given initialisation -> sorted params, posteriors, n_iter."""
    from sklearn.mixture import GaussianMixture

    prec = 1.0 / np.asarray(var0, dtype=np.float64)
    prec_init = prec.reshape(2, 1, 1) if cov_type == "full" else prec
    gm = GaussianMixture(2, covariance_type=cov_type, tol=tol, reg_covar=reg_covar, max_iter=max_iter,
                         weights_init=np.asarray(w0), means_init=np.asarray(mu0).reshape(2, 1),
                         precisions_init=prec_init)
    X = x.reshape(-1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning for fixed-iteration comparisons
        gm.fit(X)
    order = np.argsort(gm.means_[:, 0], kind="stable")
    var = gm.covariances_.reshape(2)[order]
    return (gm.weights_[order], gm.means_[order, 0], var, gm.predict_proba(X)[:, order[0]], gm.n_iter_)


def assert_same_fit(a, b):
    """Two fits of the same data: bitwise equal on the CPU (fixed summation order); on a GPU the per-class sums
    are atomic additions whose order varies between runs, so float64 results agree to rounding only."""
    if a.device.type == "cpu":
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def check_against_sklearn(values, labels, C, init, *, cov_type, tol_, reg_covar, max_iter, device, rtol, atol):
    values, labels = values.to(device), labels.to(device)
    w0, mu0, var0 = init
    raw = torch.ops.ddfast.classwise_gmm if trust_mod._use_kernel("classwise_gmm", values.device, values) \
        else ref.classwise_gmm
    post, w, mu, var, n_iter = raw(values, labels, C, max_iter, tol_, reg_covar, w0.to(device), mu0.to(device),
                                   var0.to(device))
    fit = ops.classwise_gmm(values, labels, C, max_iter, tol=tol_, reg_covar=reg_covar,
                            init=(w0.to(device), mu0.to(device), var0.to(device)))
    for a, b in zip(fit, (post, w, mu, var)):
        assert_same_fit(a, b)
    x64 = values.cpu().double()
    lab = labels.cpu()
    for c in range(C):
        idx = (lab == c).nonzero().flatten()
        if idx.numel() < 2:
            continue
        sw, smu, svar, spost, sn = sklearn_fit(x64[idx].numpy(), w0[c].double().numpy(), mu0[c].double().numpy(),
                                               var0[c].double().numpy(), cov_type=cov_type, tol=tol_,
                                               reg_covar=reg_covar, max_iter=max_iter)
        assert int(n_iter[c]) == sn, f"class {c}: {int(n_iter[c])} iterations, scikit-learn {sn}"
        kw = dict(rtol=rtol, atol=atol, check_dtype=False)
        torch.testing.assert_close(w[c].cpu().double(), torch.from_numpy(sw), **kw)
        torch.testing.assert_close(mu[c].cpu().double(), torch.from_numpy(smu), **kw)
        torch.testing.assert_close(var[c].cpu().double(), torch.from_numpy(svar), **kw)
        torch.testing.assert_close(post.cpu()[idx].double(), torch.from_numpy(spost), **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cov_type", ["full", "spherical"])
@pytest.mark.parametrize("data", ["separated", "overlapping"])
@pytest.mark.parametrize("init", ["mean_split", "minmax"])
def test_gmm_matches_sklearn_float64(device, cov_type, data, init):
    if data == "separated":
        values, labels = bimodal([400, 250, 3000, 90], seed=1)
    else:
        values, labels = bimodal([500, 300, 2500, 60], seed=2, sep=1.2, frac_high=0.5, sd=(1.0, 0.8))
    C = 5  # class 4 is empty
    w0, mu0, var0 = ref.gmm_init(values, labels, C, init, 1e-6)
    check_against_sklearn(values, labels, C, (w0, mu0, var0), cov_type=cov_type, tol_=1e-3, reg_covar=1e-6,
                          max_iter=100, device=device, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_gmm_fixed_iterations_and_explicit_init(device):
    # tol=0: exactly num_iters iterations; a deliberately poor explicit init so that the parameters keep moving
    values, labels = bimodal([700, 400], seed=3, sep=2.0)
    w0 = torch.tensor([[0.5, 0.5], [0.9, 0.1]], dtype=torch.float64)
    mu0 = torch.tensor([[2.5, -1.0], [0.0, 0.3]], dtype=torch.float64)
    var0 = torch.tensor([[4.0, 0.5], [1.0, 2.0]], dtype=torch.float64)
    check_against_sklearn(values, labels, 2, (w0, mu0, var0), cov_type="full", tol_=0.0, reg_covar=1e-4,
                          max_iter=7, device=device, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_gmm_float32_matches_sklearn(device):
    values, labels = bimodal([800, 500, 1200], seed=4)
    w0, mu0, var0 = ref.gmm_init(values, labels, 3, "mean_split", 1e-6)
    check_against_sklearn(values.float(), labels, 3, (w0.float(), mu0.float(), var0.float()), cov_type="full",
                          tol_=0.0, reg_covar=1e-6, max_iter=20, device=device, rtol=2e-4, atol=2e-5)


@needs_kernels
@pytest.mark.parametrize("device", DEVICES)
def test_gmm_kernel_matches_reference(device):
    values, labels = bimodal([300] * 40 + [5000, 1, 0, 2], seed=5, sep=2.0)
    C = 45
    for dt in FLOAT_DTYPES:
        v = values.to(dt).to(device)
        y = labels.to(device)
        init = ref.gmm_init(v, y, C, "mean_split", 1e-5)
        tol_ = 1e-4 if dt == torch.float64 else 0.0  # float32: fixed iterations (rounding may shift the stop)
        a = torch.ops.ddfast.classwise_gmm(v, y, C, 30, tol_, 1e-5, *init)
        b = ref.classwise_gmm(v, y, C, 30, tol_, 1e-5, *init)
        t = tol(dt, 100.0) if dt == torch.float32 else tol(dt, 10.0)
        for x1, x2 in zip(a[:4], b[:4]):
            torch.testing.assert_close(x1, x2, **t)
        if dt == torch.float64:
            assert torch.equal(a[4], b[4])


@needs_kernels
@pytest.mark.parametrize("device", DEVICES)
def test_gmm_indistinguishable_components_agree_across_backends(device, monkeypatch):
    """Values around 1e-12 with reg_covar 1e-6 give two components whose means differ by rounding only: they are
    a tie and keep their EM order, so the kernel and the reference give the same posteriors (they used to differ
    by up to 0.3: one backend sorted them, the other did not). A float32 class of one sample around -1.3e11 beside
    ordinary classes agrees too."""
    import ddfast.ops.trust as trust_mod

    g = torch.Generator().manual_seed(80)
    tiny = (torch.randn(200, generator=g, dtype=torch.float64) * 1e-12).float()
    bimodal_199 = torch.randn(199, generator=g) + 2 * (torch.rand(199, generator=g) < 0.3)
    mixed = torch.cat([torch.tensor([-1.3e11]), bimodal_199])
    y_mixed = torch.cat([torch.tensor([3]), torch.randint(0, 3, (199,), generator=g)])
    cases = [(tiny, torch.randint(0, 4, (200,), generator=g)), (mixed.float(), y_mixed)]
    for v, y in cases:
        a = ops.classwise_gmm(v.to(device), y.to(device), 4)
        monkeypatch.setattr(trust_mod, "_use_kernel", lambda *args: False)
        b = ops.classwise_gmm(v.to(device), y.to(device), 4)
        monkeypatch.undo()
        torch.testing.assert_close(a.posterior_low, b.posterior_low, atol=1e-4, rtol=0)
        torch.testing.assert_close(a.variances, b.variances, rtol=1e-3, atol=0)
    w, mu, var = ref.gmm_init(cases[0][0], cases[0][1], 4, "mean_split", 1e-6)
    fit = ops.classwise_gmm(cases[0][0].to(device), cases[0][1].to(device), 4)
    torch.testing.assert_close(fit.weights.cpu(), w)  # the tie kept the initial (EM) order: no swap


@pytest.mark.parametrize("device", DEVICES)
def test_gmm_degenerate_classes(device):
    reg = 1e-6
    x = torch.tensor([5.0, 1.0, 2.0, 3.0, 3.0, 3.0, 0.5, 9.5], dtype=torch.float64)
    y = torch.tensor([1, 2, 2, 3, 3, 3, 4, 4])  # class 0 empty, 1: one sample, 2: two, 3: constant, 4: two
    fit = ops.classwise_gmm(x.to(device), y.to(device), 5, reg_covar=reg)
    for t in fit:
        assert torch.isfinite(t).all()
    w, mu, var, post = (t.cpu() for t in (fit.weights, fit.means, fit.variances, fit.posterior_low))
    assert w[0].tolist() == [0.5, 0.5] and mu[0].tolist() == [0.0, 0.0] and var[0].tolist() == [reg, reg]
    assert w[1].tolist() == [0.5, 0.5] and mu[1].tolist() == [5.0, 5.0] and var[1].tolist() == [reg, reg]
    assert post[0].item() == pytest.approx(0.5, abs=1e-15)
    # constant class: two identical components (n_k carries scikit-learn's 10 eps, hence approx)
    assert mu[3].tolist() == pytest.approx([3.0, 3.0], rel=1e-13) and var[3].tolist() == pytest.approx([reg, reg])
    assert post[3:6].tolist() == pytest.approx([0.5] * 3, abs=1e-15)
    # two samples: each its own component (scikit-learn agrees from the same init)
    assert post[1].item() == pytest.approx(1.0) and post[2].item() == pytest.approx(0.0, abs=1e-12)
    assert mu[2].tolist() == pytest.approx([1.0, 2.0]) and var[2].tolist() == pytest.approx([reg, reg])
    init = ref.gmm_init(x, y, 5, "mean_split", reg)
    check_against_sklearn(x, y, 5, init, cov_type="full", tol_=1e-3, reg_covar=reg, max_iter=100, device=device,
                          rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_gmm_components_ordered_and_init_options(device):
    values, labels = bimodal([600, 600], seed=6)
    values, labels = values.to(device), labels.to(device)
    # an explicit init with the high component first: the output still has component 0 = lower mean
    w0 = torch.tensor([[0.3, 0.7]] * 2, dtype=torch.float64, device=device)
    mu0 = torch.tensor([[3.0, 0.0]] * 2, dtype=torch.float64, device=device)
    var0 = torch.tensor([[0.25, 0.1]] * 2, dtype=torch.float64, device=device)
    fit = ops.classwise_gmm(values, labels, 2, tol=1e-10, init=(w0, mu0, var0))
    assert (fit.means[:, 0] < fit.means[:, 1]).all()
    base = ops.classwise_gmm(values, labels, 2, tol=1e-10)
    torch.testing.assert_close(fit.means, base.means, rtol=1e-3, atol=1e-3)
    low = values < 1.5
    assert ((base.posterior_low > 0.5) == low).float().mean() > 0.98
    mm = ops.classwise_gmm(values, labels, 2, tol=1e-10, init="minmax")
    torch.testing.assert_close(mm.means, base.means, rtol=1e-3, atol=1e-3)
    # warm start from the previous fit
    warm = ops.classwise_gmm(values, labels, 2, tol=1e-10, init=(base.weights, base.means, base.variances))
    torch.testing.assert_close(warm.means, base.means, rtol=1e-6, atol=1e-6)
    # num_iters=0: the initialisation itself (ordered)
    zero = ops.classwise_gmm(values, labels, 2, 0, init=(w0, mu0, var0))
    assert zero.means[0].tolist() == [0.0, 3.0] and zero.weights[0].tolist() == [0.7, 0.3]


@pytest.mark.parametrize("device", DEVICES)
def test_gmm_noncontiguous_and_empty(device):
    values, labels = bimodal([300, 200], seed=7)
    v2 = torch.stack([values, -values], 1).to(device)[:, 0]
    y2 = torch.stack([labels, labels], 1).to(device)[:, 0]
    assert not v2.is_contiguous() and not y2.is_contiguous()
    a = ops.classwise_gmm(v2, y2, 2)
    b = ops.classwise_gmm(values.to(device), labels.to(device), 2)
    for x1, x2 in zip(a, b):
        assert_same_fit(x1, x2)
    e = ops.classwise_gmm(torch.empty(0, dtype=torch.float64, device=device),
                          torch.empty(0, dtype=torch.long, device=device), 3)
    assert e.posterior_low.shape == (0,) and e.means.shape == (3, 2)
    assert torch.isfinite(e.variances).all()


def test_gmm_errors():
    v = torch.rand(10, dtype=torch.float64)
    y = torch.randint(0, 2, (10,))
    with pytest.raises(ValueError, match="values"):
        ops.classwise_gmm(v[None], y, 2)
    with pytest.raises(TypeError, match="values"):
        ops.classwise_gmm(v.half(), y, 2)
    with pytest.raises(ValueError, match="labels"):
        ops.classwise_gmm(v, y[:5], 2)
    with pytest.raises(ValueError, match="labels must lie"):
        ops.classwise_gmm(v, y + 1, 2)
    for bad in (float("nan"), float("inf")):
        vv = v.clone()
        vv[3] = bad
        with pytest.raises(ValueError, match="NaN or inf"):
            ops.classwise_gmm(vv, y, 2)
    with pytest.raises(ValueError, match="num_classes"):
        ops.classwise_gmm(v, y * 0, 0)
    with pytest.raises(TypeError, match="num_classes"):
        ops.classwise_gmm(v, y, 2.0)
    with pytest.raises(ValueError, match="num_iters"):
        ops.classwise_gmm(v, y, 2, -1)
    with pytest.raises(ValueError, match="tol"):
        ops.classwise_gmm(v, y, 2, tol=-1.0)
    with pytest.raises(ValueError, match="reg_covar"):
        ops.classwise_gmm(v, y, 2, reg_covar=0.0)
    with pytest.raises(ValueError, match="unknown method"):
        ops.classwise_gmm(v, y, 2, init="kmeans")
    good = ref.gmm_init(v, y, 2, "mean_split", 1e-6)
    with pytest.raises(ValueError, match="init means"):
        ops.classwise_gmm(v, y, 2, init=(good[0], good[1][:1], good[2]))
    with pytest.raises(ValueError, match="sum to 1"):
        ops.classwise_gmm(v, y, 2, init=(good[0] * 2, good[1], good[2]))
    with pytest.raises(ValueError, match="variances"):
        ops.classwise_gmm(v, y, 2, init=(good[0], good[1], -good[2]))
    with pytest.raises(TypeError, match="init"):
        ops.classwise_gmm(v, y, 2, init=(good[0], good[1]))
    with pytest.raises(RuntimeError, match="not differentiable"):
        ops.classwise_gmm(v.clone().requires_grad_(), y, 2)
    if trust_mod._KERNELS:
        with pytest.raises(ValueError, match="labels"):
            torch.ops.ddfast.classwise_gmm(v, y + 1, 2, 10, 1e-3, 1e-6, *good)


@needs_kernels
@pytest.mark.parametrize("device", DEVICES)
def test_gmm_opcheck(device):
    values, labels = bimodal([50, 30, 1], seed=8)
    for dt in FLOAT_DTYPES:
        v = values.to(dt).to(device)
        y = labels.to(device)
        init = ref.gmm_init(v, y, 4, "mean_split", 1e-6)
        torch.library.opcheck(_raw("classwise_gmm"), (v, y, 4, 20, 1e-3, 1e-6, *init))


# ==================================================================================================
# anchor_distances
# ==================================================================================================
def expected_anchor(f, a, p, eps):
    """Explicit float64 loop over (i, c)."""
    f, a = f.detach().cpu().double(), a.detach().cpu().double()
    p = None if p is None else p.detach().cpu().double()
    N, C = f.shape[0], a.shape[0]
    maha = torch.empty(N, C, dtype=torch.float64)
    cos = torch.empty(N, C, dtype=torch.float64)
    for i in range(N):
        for c in range(C):
            d = f[i] - a[c]
            maha[i, c] = d @ d if p is None else d @ p @ d
            cos[i, c] = (f[i] @ a[c]) / (max(f[i].norm().item(), eps) * max(a[c].norm().item(), eps))
    return maha, cos


def spd(d, seed, dtype=torch.float64):
    m = torch.randn(d, d, generator=gen(seed), dtype=torch.float64)
    return (m @ m.T / d + 0.1 * torch.eye(d, dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("with_p", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 1), (13, 5, 7), (9, 3, 130)])
def test_anchor_distances_matches_loop(device, dtype, with_p, shape):
    N, C, D = shape
    f = (torch.randn(N, D, generator=gen(N), dtype=torch.float64) + 2.0).to(dtype).to(device)
    a = (torch.randn(C, D, generator=gen(C + 7), dtype=torch.float64) + 2.0).to(dtype).to(device)
    p = spd(D, D, dtype).to(device) if with_p else None
    out = ops.anchor_distances(f, a, p)
    assert isinstance(out, ops.AnchorDistances) and out.mahalanobis_sq.dtype == dtype
    em, ec = expected_anchor(f, a, p, 1e-8)
    t = tol(dtype, 20.0)
    torch.testing.assert_close(out.mahalanobis_sq.cpu().double(), em, **t)
    torch.testing.assert_close(out.cosine.cpu().double(), ec, **t)
    rm, rc = ref.anchor_distances(f, a, p, 1e-8)
    torch.testing.assert_close(rm.cpu().double(), em, **t)
    torch.testing.assert_close(rc.cpu().double(), ec, **t)


@pytest.mark.parametrize("device", DEVICES)
def test_anchor_distances_cancellation_float32(device):
    # features far from the origin, close to their anchors: the expanded ||f||^2 - 2 f.a + ||a||^2 in float32
    # loses every digit; the kernel's direct form keeps a small relative error
    D = 256
    g = gen(11)
    a = 300.0 + torch.randn(3, D, generator=g, dtype=torch.float64)
    f = a[torch.tensor([0, 1, 2, 0])] + 1e-2 * torch.randn(4, D, generator=g, dtype=torch.float64)
    p = spd(D, 12)
    for prec in (None, p):
        em, _ = expected_anchor(f, a, prec, 1e-8)
        out = ops.anchor_distances(f.float().to(device), a.float().to(device),
                                   None if prec is None else prec.float().to(device))
        m = out.mahalanobis_sq.cpu().double()
        near = em < em.mean()
        rel = ((m - em).abs() / em)[near]
        assert rel.max() < 2e-2, rel.max()


@pytest.mark.parametrize("device", DEVICES)
def test_anchor_distances_zero_vectors_asymmetric_p_noncontig(device):
    f = torch.randn(6, 8, generator=gen(1), dtype=torch.float64)
    f[2] = 0
    a = torch.randn(3, 8, generator=gen(2), dtype=torch.float64)
    a[1] = 0
    out = ops.anchor_distances(f.to(device), a.to(device))
    assert torch.isfinite(out.cosine).all()
    assert out.cosine[2].abs().max() == 0 and out.cosine[:, 1].abs().max() == 0
    # a non-symmetric P gives the value of its symmetric part
    q = torch.randn(8, 8, generator=gen(3), dtype=torch.float64)
    ps = spd(8, 4)
    pa = ps + (q - q.T)
    m1 = ops.anchor_distances(f.to(device), a.to(device), pa.to(device)).mahalanobis_sq
    m2 = ops.anchor_distances(f.to(device), a.to(device), ps.to(device)).mahalanobis_sq
    torch.testing.assert_close(m1, m2, **tol(torch.float64, 100.0))
    # non-contiguous everything
    fw = torch.randn(8, 12, generator=gen(5), dtype=torch.float64).t()  # [12, 8], stride(1) != 1
    aw = torch.randn(3, 16, generator=gen(6), dtype=torch.float64)[:, ::2]
    pt = ps.t()
    out = ops.anchor_distances(fw.to(device), aw.to(device), pt.to(device))
    em, ec = expected_anchor(fw, aw, pt, 1e-8)
    torch.testing.assert_close(out.mahalanobis_sq.cpu(), em, **tol(torch.float64, 100.0))
    torch.testing.assert_close(out.cosine.cpu(), ec, **tol(torch.float64, 100.0))
    # empty shapes
    z = ops.anchor_distances(torch.empty(0, 4, device=device), torch.randn(2, 4, device=device))
    assert z.mahalanobis_sq.shape == (0, 2)
    z = ops.anchor_distances(torch.randn(3, 0, device=device), torch.randn(2, 0, device=device))
    assert z.mahalanobis_sq.abs().max() == 0 and z.cosine.abs().max() == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_p", [False, True])
def test_anchor_distances_gradcheck(device, with_p):
    f = torch.randn(5, 4, generator=gen(1), dtype=torch.float64).to(device).requires_grad_()
    a = torch.randn(3, 4, generator=gen(2), dtype=torch.float64).to(device).requires_grad_()
    inputs = [f, a]
    if with_p:
        q = torch.randn(4, 4, generator=gen(3), dtype=torch.float64)
        p = (spd(4, 3) + q - q.T).to(device)  # non-symmetric, positive definite symmetric part
        inputs.append(p.requires_grad_())
    fn = lambda *xs: tuple(ops.anchor_distances(xs[0], xs[1], xs[2] if with_p else None))  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(inputs))
    # and the same gradients as autograd through the reference composite
    gm = torch.randn(5, 3, generator=gen(4), dtype=torch.float64).to(device)
    gc = torch.randn(5, 3, generator=gen(5), dtype=torch.float64).to(device)
    g1 = torch.autograd.grad(fn(*inputs), inputs, (gm, gc))
    pin = inputs[2] if with_p else None
    rm, rc = ref.anchor_distances(inputs[0], inputs[1], pin, 1e-8)
    if with_p:  # the reference clamps at 0: compare where no clamp is active
        assert (rm > 0).all()
    g2 = torch.autograd.grad((rm, rc), inputs, (gm, gc))
    for x1, x2 in zip(g1, g2):
        torch.testing.assert_close(x1, x2, **tol(torch.float64, 100.0))


def test_anchor_distances_errors():
    f = torch.randn(4, 3)
    a = torch.randn(2, 3)
    with pytest.raises(ValueError, match="features"):
        ops.anchor_distances(f[0], a)
    with pytest.raises(TypeError, match="features"):
        ops.anchor_distances(f.long(), a)
    with pytest.raises(TypeError, match="anchors"):
        ops.anchor_distances(f, a.double())
    with pytest.raises(ValueError, match="anchors"):
        ops.anchor_distances(f, torch.randn(2, 4))
    with pytest.raises(ValueError, match="anchors"):
        ops.anchor_distances(f, a.to("meta"))
    with pytest.raises(ValueError, match="square"):
        ops.anchor_distances(f, a, torch.randn(3, 4))
    with pytest.raises(TypeError, match="precision"):
        ops.anchor_distances(f, a, torch.eye(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="eps"):
        ops.anchor_distances(f, a, eps=0.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reference", [False, True])
def test_anchor_distances_non_finite_inputs_are_named(device, reference, monkeypatch):
    """NaN / inf in any input: the same ValueError naming it on the kernel and the reference."""
    if reference:
        monkeypatch.setattr(trust_mod, "_use_kernel", lambda *a: False)
    f, a, p = torch.randn(4, 3, device=device), torch.randn(2, 3, device=device), torch.eye(3, device=device)
    for name, bad in (("features", float("inf")), ("anchors", float("nan")), ("precision", float("inf"))):
        args = {"features": f.clone(), "anchors": a.clone(), "precision": p.clone()}
        args[name][1, 1] = bad
        with pytest.raises(ValueError, match=f"{name} has NaN or inf"):
            ops.anchor_distances(args["features"], args["anchors"], args["precision"])


@needs_kernels
@pytest.mark.parametrize("device", DEVICES)
def test_anchor_distances_opcheck(device):
    f = torch.randn(7, 5, generator=gen(1), dtype=torch.float64).to(device)
    a = torch.randn(3, 5, generator=gen(2), dtype=torch.float64).to(device)
    p = spd(5, 3).to(device)
    for args in [(f, a, None, 1e-8), (f, a, p, 1e-8), (f.float(), a.float(), p.float(), 1e-6)]:
        torch.library.opcheck(_raw("anchor_distances"), args)
    args = (f.clone().requires_grad_(), a.clone().requires_grad_(), p.clone().requires_grad_(), 1e-8)
    torch.library.opcheck(_raw("anchor_distances"), args)


# ==================================================================================================
# torch.compile, fallback
# ==================================================================================================
@needs_kernels
@pytest.mark.parametrize("device", DEVICES)
def test_trust_ops_compile_fullgraph(device):
    torch._dynamo.reset()

    def pipeline(z, y, ema, feats, anchors, prec):
        st = ops.sample_stats(z, y, ema=ema, momentum=0.5)
        fit = ops.classwise_gmm(ema, y, 4, 10)
        d = ops.anchor_distances(feats, anchors, prec)
        return st.loss, st.prediction, fit.posterior_low, fit.means, d.mahalanobis_sq, d.cosine

    z, y = make_logits(64, 4, torch.float32, device)
    ema1 = torch.rand(64, generator=gen(9)).to(device) + 1.0
    ema2 = ema1.clone()
    feats = torch.randn(64, 6, generator=gen(2)).to(device)
    anchors = torch.randn(4, 6, generator=gen(3)).to(device)
    prec = spd(6, 4, torch.float32).to(device)
    eager = pipeline(z, y, ema1, feats, anchors, prec)
    compiled = torch.compile(pipeline, fullgraph=True)(z, y, ema2, feats, anchors, prec)
    torch.testing.assert_close(ema1, ema2)  # the in-place EMA happened under compile too
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)


_CHILD = r"""
import json, torch, ddfast.ops as o, ddfast._extension as ext
from ddfast.ops import trust
g = torch.Generator().manual_seed(0)
z = torch.randn(20, 6, generator=g, dtype=torch.float64); y = torch.randint(0, 6, (20,), generator=g)
ema = torch.zeros(20, dtype=torch.float64)
s = o.sample_stats(z, y, ema=ema, momentum=0.25)
v = torch.cat([torch.rand(30, generator=g, dtype=torch.float64), 3 + torch.rand(10, generator=g, dtype=torch.float64)])
lab = torch.arange(40) % 2
f = o.classwise_gmm(v, lab, 2)
d = o.anchor_distances(z, z[:3], torch.eye(6, dtype=torch.float64))
errs = []
for call in (lambda: o.sample_stats(z, y + 6), lambda: o.classwise_gmm(v * float("nan"), lab, 2)):
    try:
        call()
    except ValueError as e:
        errs.append(str(e)[:40])
print(json.dumps({"has_extension": o.has_extension(), "kernels": trust._KERNELS, "loss": s.loss.tolist(),
                  "ema": ema.tolist(), "pred": s.prediction.tolist(), "post": f.posterior_low.tolist(),
                  "means": f.means.tolist(), "maha": d.mahalanobis_sq.tolist(), "errors": errs}))
"""


def test_fallback_path_without_extension():
    env = dict(os.environ, DDFAST_DISABLE_EXTENSION="1")
    res = subprocess.run([sys.executable, "-c", _CHILD], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["has_extension"] is False and out["kernels"] == {}
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 6, (20,), generator=g)
    loss, _, _, pred = expected_stats(z, y)
    torch.testing.assert_close(torch.tensor(out["loss"], dtype=torch.float64), loss)
    torch.testing.assert_close(torch.tensor(out["ema"], dtype=torch.float64), 0.75 * loss)
    assert out["pred"] == pred.tolist()
    v = torch.cat([torch.rand(30, generator=g, dtype=torch.float64), 3 + torch.rand(10, generator=g, dtype=torch.float64)])
    lab = torch.arange(40) % 2
    here = ops.classwise_gmm(v, lab, 2)
    torch.testing.assert_close(torch.tensor(out["post"], dtype=torch.float64), here.posterior_low, **tol(torch.float64, 100.0))
    torch.testing.assert_close(torch.tensor(out["means"], dtype=torch.float64), here.means, **tol(torch.float64, 100.0))
    em, _ = expected_anchor(z, z[:3], None, 1e-8)
    torch.testing.assert_close(torch.tensor(out["maha"], dtype=torch.float64), em, **tol(torch.float64, 100.0))
    assert len(out["errors"]) == 2


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@needs_kernels
def test_cuda_matches_cpu_kernels():
    z, y = make_logits(300, 1000, torch.float32, "cpu")
    a, b = ops.sample_stats(z, y), ops.sample_stats(z.cuda(), y.cuda())
    for x1, x2 in zip(a, b):
        torch.testing.assert_close(x1, x2.cpu(), rtol=1e-5, atol=1e-6)
    values, labels = bimodal([3000, 40, 2], seed=12)
    a, b = ops.classwise_gmm(values, labels, 4), ops.classwise_gmm(values.cuda(), labels.cuda(), 4)
    for x1, x2 in zip(a, b):
        torch.testing.assert_close(x1, x2.cpu(), **tol(torch.float64, 100.0))
