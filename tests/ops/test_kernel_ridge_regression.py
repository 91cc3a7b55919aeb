"""Tests of ddfast.ops.kernel_ridge_regression and the factor-reuse API (krr_factor / krr_solve / krr_predict).

Oracle: ``torch.linalg.solve`` in float64 of ``(X_s X_s^T + ridge I) alpha = Y_s``, ``pred = X_q X_s^T alpha``, and
autograd through it for the gradients. Every test runs on the compiled kernel (when loaded) and on the reference
path (``path`` fixture).
"""
from __future__ import annotations

import pytest
import torch

import ddfast._extension as ext
from ddfast.ops import kernel_ridge_regression
from ddfast.ops.krr import KRRFactor, krr_factor, krr_predict, krr_solve

from _helpers import DEVICES, FLOAT_DTYPES, randn, tol

needs_ext = pytest.mark.skipif(not ext.has_extension(), reason="compiled extension not loaded")


@pytest.fixture(params=["kernel", "reference"])
def path(request, monkeypatch):
    if request.param == "kernel" and not ext.has_extension():
        pytest.skip("compiled extension not loaded")
    if request.param == "reference":
        monkeypatch.setattr(ext, "use_kernel", lambda *a: False)
    return request.param


def truth(xs, ys, xq, ridge):
    """float64 oracle by torch.linalg.solve (batched inputs, ridge float or [B])."""
    xs, ys, xq = xs.double(), ys.double(), xq.double()
    r = torch.as_tensor(ridge, dtype=torch.float64, device=xs.device)
    r = r.reshape(-1, 1, 1) if r.dim() > 0 else r
    n = xs.shape[-2]
    A = xs @ xs.mT + r * torch.eye(n, dtype=torch.float64, device=xs.device)
    return (xq @ xs.mT) @ torch.linalg.solve(A, ys)


def make(B, n, p, m, C, *, dtype=torch.float64, device="cpu", seed=0, noncontig=None, grad=False):
    """Well-scaled random inputs: features with unit-norm rows on average (K_ss entries O(1))."""
    bs = () if B is None else (B,)
    scale = max(p, 1) ** -0.5
    xs = randn(bs + (n, p), dtype=dtype, device=device, seed=seed, scale=scale, noncontig=noncontig)
    ys = randn(bs + (n, C), dtype=dtype, device=device, seed=seed + 1, noncontig=noncontig)
    xq = randn(bs + (m, p), dtype=dtype, device=device, seed=seed + 2, scale=scale, noncontig=noncontig)
    if grad:
        for x in (xs, ys, xq):
            x.requires_grad_(True)
    return xs, ys, xq


# (B, n, p, m, C): edges n=1, m=1, C=1/2, p=1, n>p (needs the ridge), n > 64 (LAPACK/cuSOLVER path), RCIG-like
SHAPES = [(1, 1, 1, 1, 1), (2, 1, 8, 3, 2), (3, 5, 7, 4, 2), (2, 20, 64, 9, 10), (1, 12, 4, 1, 1),
          (2, 70, 40, 5, 3), (1, 130, 16, 6, 2), (4, 33, 128, 17, 1)]


# ---------------------------------------------------------------------------------------------------------------
# values and gradients

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_grads_match_float64_solve(path, device, dtype, shape):
    B, n, p, m, C = shape
    xs, ys, xq = make(*shape, dtype=dtype, device=device, grad=True)
    ridge = torch.linspace(0.5, 1.0, B, dtype=dtype, device=device).requires_grad_(True)
    pred = kernel_ridge_regression(xs, ys, xq, ridge)
    assert pred.shape == (B, m, C) and pred.dtype == dtype
    want = truth(xs.detach(), ys.detach(), xq.detach(), ridge.detach())
    torch.testing.assert_close(pred.double(), want, **tol(dtype, 10))

    G = randn((B, m, C), dtype=dtype, device=device, seed=7)
    got = torch.autograd.grad(pred, (xs, ys, xq, ridge), G)
    leaves = [x.detach().double().requires_grad_(True) for x in (xs, ys, xq, ridge)]
    ref = torch.autograd.grad(truth(*leaves), leaves, G.double())
    for name, a, b in zip(("support_x", "support_y", "query_x", "ridge"), got, ref):
        assert a.shape == b.shape and a.dtype == dtype, name
        scale = b.abs().max().item() + 1e-12
        torch.testing.assert_close(a.double() / scale, b / scale, **tol(dtype, 50), msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_unbatched_and_float_ridge(path, device):
    xs, ys, xq = make(None, 6, 9, 4, 3, device=device)
    pred = kernel_ridge_regression(xs, ys, xq, 0.3)
    assert pred.shape == (4, 3)
    torch.testing.assert_close(pred, truth(xs[None], ys[None], xq[None], 0.3)[0])
    pred2 = kernel_ridge_regression(xs, ys, xq, torch.tensor(0.3, dtype=torch.float64))
    torch.testing.assert_close(pred2, pred)
    xb, yb, qb = (x.unsqueeze(0).expand(3, *x.shape) for x in (xs, ys, xq))
    torch.testing.assert_close(kernel_ridge_regression(xb, yb, qb, 0.3), pred.expand(3, 4, 3))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("noncontig", ["rowstride", "step", "transpose"])
def test_non_contiguous_inputs(path, device, noncontig):
    xs, ys, xq = make(2, 6, 11, 5, 3, device=device, noncontig=noncontig, grad=True)
    assert not xs.is_contiguous() and not xq.is_contiguous()
    pred = kernel_ridge_regression(xs, ys, xq, 0.2)
    torch.testing.assert_close(pred, truth(xs.detach(), ys.detach(), xq.detach(), 0.2))
    got = torch.autograd.grad(pred.sum(), (xs, ys, xq))
    leaves = [x.detach().clone().requires_grad_(True) for x in (xs, ys, xq)]
    ref = torch.autograd.grad(truth(*leaves, 0.2).sum(), leaves)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_large_feature_values(path, device):
    """Features ~1e6 (K ~1e12): still accurate in float64 with a ridge of matching scale."""
    xs, ys, xq = make(2, 8, 16, 3, 2, device=device)
    pred = kernel_ridge_regression(xs * 1e6, ys, xq * 1e6, 1e11)
    torch.testing.assert_close(pred, truth(xs * 1e6, ys, xq * 1e6, 1e11), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_and_gradgradcheck(path, device):
    xs, ys, xq = make(2, 4, 5, 3, 2, device=device, grad=True)
    r = torch.tensor([0.3, 0.6], dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(kernel_ridge_regression, (xs, ys, xq, r))
    if path == "kernel":  # the reference's double backward is plain autograd of torch.linalg
        xs, ys, xq = make(1, 3, 4, 2, 2, device=device, grad=True)
        assert torch.autograd.gradgradcheck(kernel_ridge_regression, (xs, ys, xq, r[:1]))


@pytest.mark.parametrize("device", DEVICES)
def test_only_requested_gradients(path, device):
    xs, ys, xq = make(2, 5, 6, 3, 2, device=device)
    ys.requires_grad_(True)
    kernel_ridge_regression(xs, ys, xq, 0.5).sum().backward()
    assert xs.grad is None and xq.grad is None and ys.grad is not None
    leaf = ys.detach().clone().requires_grad_(True)
    truth(xs, leaf, xq, 0.5).sum().backward()
    torch.testing.assert_close(ys.grad, leaf.grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 3, 4, 2, 2), (2, 0, 4, 3, 2), (2, 3, 4, 0, 2), (2, 3, 4, 2, 0), (2, 3, 0, 2, 2)])
def test_empty_dimensions(path, device, shape):
    xs, ys, xq = make(*shape, device=device, grad=True)
    pred = kernel_ridge_regression(xs, ys, xq, 0.5)
    B, n, p, m, C = shape
    assert pred.shape == (B, m, C)
    torch.testing.assert_close(pred, truth(xs.detach(), ys.detach(), xq.detach(), 0.5))
    if n == 0 or p == 0:
        assert (pred == 0).all()
    pred.sum().backward()
    assert xs.grad.shape == xs.shape and ys.grad.shape == ys.shape and xq.grad.shape == xq.shape


# ---------------------------------------------------------------------------------------------------------------
# factor reuse (RCIG inner steps)

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [6, 90])  # small (shared-memory / hand-written) and large (LAPACK / cuSOLVER) paths
def test_factor_reuse_matches_fresh_solves(path, device, n):
    xs, ys, xq = make(2, n, 24, 7, 3, device=device, grad=True)
    ridge = torch.tensor([0.4, 0.9], dtype=torch.float64, device=device, requires_grad=True)
    f = krr_factor(xs, ridge)
    assert isinstance(f, KRRFactor) and f.cholesky.shape == (2, n, n) and f.batched
    L = f.cholesky.detach()
    A = xs.detach() @ xs.detach().mT + ridge.detach().view(2, 1, 1) * torch.eye(n, dtype=torch.float64, device=device)
    torch.testing.assert_close(L @ L.mT, A)
    assert torch.equal(L, L.tril())
    total = 0
    for k in range(3):  # three right-hand sides, one factorisation
        rhs = randn((2, n, 3), dtype=torch.float64, device=device, seed=10 + k).requires_grad_(True)
        alpha = krr_solve(f, rhs)
        torch.testing.assert_close(alpha, torch.linalg.solve(A, rhs.detach()))
        total = total + (alpha * rhs.detach().cos()).sum()
    pred = krr_predict(f, ys, xq)
    torch.testing.assert_close(pred, kernel_ridge_regression(xs.detach(), ys.detach(), xq.detach(), ridge.detach()))
    (total + pred.square().sum()).backward()
    # the same computation with fresh torch.linalg.solve calls in float64
    leaves = [x.detach().clone().requires_grad_(True) for x in (xs, ys, xq, ridge)]
    A2 = leaves[0] @ leaves[0].mT + leaves[3].view(2, 1, 1) * torch.eye(n, dtype=torch.float64, device=device)
    total2 = 0
    for k in range(3):
        rhs = randn((2, n, 3), dtype=torch.float64, device=device, seed=10 + k)
        total2 = total2 + (torch.linalg.solve(A2, rhs) * rhs.cos()).sum()
    pred2 = (leaves[2] @ leaves[0].mT) @ torch.linalg.solve(A2, leaves[1])
    (total2 + pred2.square().sum()).backward()
    for name, a, b in zip(("support_x", "support_y", "query_x", "ridge"), (xs, ys, xq, ridge), leaves):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_factor_reuse_gradcheck_and_hvp(path, device):
    """krr_solve is twice differentiable (RCIG's Hessian-inverse products differentiate through it)."""
    xs, ys, _ = make(1, 3, 4, 2, 2, device=device, grad=True)
    r = torch.tensor([0.3], dtype=torch.float64, device=device, requires_grad=True)

    def solve(xs, ys, r):
        return krr_solve(krr_factor(xs, r), ys)

    def predict(xs, ys, xq, r):
        return krr_predict(krr_factor(xs, r), ys, xq)

    xq = randn((1, 2, 4), dtype=torch.float64, device=device, seed=5, requires_grad=True)
    assert torch.autograd.gradcheck(solve, (xs, ys, r))
    assert torch.autograd.gradcheck(predict, (xs, ys, xq, r))
    if path == "kernel":  # the reference's double backward is plain autograd of torch.linalg
        assert torch.autograd.gradgradcheck(solve, (xs, ys, r))
        assert torch.autograd.gradgradcheck(predict, (xs, ys, xq, r))


@pytest.mark.parametrize("device", DEVICES)
def test_rcig_inner_loss_identities(path, device):
    """R - K alpha = ridge alpha and tr(alpha^T K alpha) = sum(alpha R) - ridge ||alpha||^2 (documented in krr_solve)."""
    xs, ys, _ = make(1, 10, 30, 1, 4, device=device)
    f = krr_factor(xs, 0.25)
    alpha = krr_solve(f, ys)
    K = xs @ xs.mT
    torch.testing.assert_close(ys - K @ alpha, 0.25 * alpha)
    torch.testing.assert_close((alpha * (K @ alpha)).sum(), (alpha * ys).sum() - 0.25 * alpha.square().sum())


@pytest.mark.parametrize("device", DEVICES)
def test_unbatched_factor(path, device):
    xs, ys, xq = make(None, 5, 8, 3, 2, device=device)
    f = krr_factor(xs, 0.5)
    assert not f.batched and f.cholesky.shape == (1, 5, 5)
    assert krr_solve(f, ys).shape == (5, 2)
    torch.testing.assert_close(krr_predict(f, ys, xq), kernel_ridge_regression(xs, ys, xq, 0.5))


@needs_ext
def test_backward_reuses_the_forward_factorisation():
    """The backward never factorises; a large-n forward factorises exactly once (profiler op counts)."""
    xs, ys, xq = make(2, 100, 16, 5, 3, grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as fwd:
        pred = kernel_ridge_regression(xs, ys, xq, 0.5)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as bwd:
        pred.sum().backward()
    count = lambda prof: sum(e.count for e in prof.key_averages() if "cholesky" in e.key and "solve" not in e.key)  # noqa: E731
    assert count(fwd) == 1
    assert count(bwd) == 0


# ---------------------------------------------------------------------------------------------------------------
# errors

@pytest.mark.parametrize("device", DEVICES)
def test_not_positive_definite_names_batch_index(path, device):
    xs, ys, xq = make(3, 6, 3, 2, 2, device=device)  # n > p: X X^T is singular
    with pytest.raises(ValueError, match="not positive definite at batch index 0"):
        kernel_ridge_regression(xs, ys, xq, 0.0)
    r = torch.tensor([0.5, 0.0, 0.5], dtype=torch.float64, device=device)
    with pytest.raises(ValueError, match="not positive definite at batch index 1"):
        kernel_ridge_regression(xs, ys, xq, r)
    with pytest.raises(ValueError, match="not positive definite at batch index 1"):
        krr_factor(xs, r)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_inf_and_negative_ridge_raise(path, device):
    xs, ys, xq = make(3, 4, 5, 2, 2, device=device)
    bad = xs.clone()
    bad[2, 1, 3] = float("nan")
    with pytest.raises(ValueError, match="support_x holds NaN/inf values.* batch index 2"):
        kernel_ridge_regression(bad, ys, xq, 0.5)
    bad = xs.clone()
    bad[1, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="support_x .*batch index 1"):
        krr_factor(bad, 0.5)
    bad = ys.clone()
    bad[1, 0, 1] = float("inf")
    with pytest.raises(ValueError, match="support_y holds NaN/inf values at batch index 1"):
        kernel_ridge_regression(xs, bad, xq, 0.5)
    f = krr_factor(xs, 0.5)
    with pytest.raises(ValueError, match="rhs holds NaN/inf values at batch index 1"):
        krr_solve(f, bad)
    with pytest.raises(ValueError, match="support_y holds NaN/inf values at batch index 1"):
        krr_predict(f, bad, xq)
    with pytest.raises(ValueError, match="ridge must be >= 0"):
        kernel_ridge_regression(xs, ys, xq, -1e-3)
    with pytest.raises(ValueError, match="ridge must be >= 0"):
        kernel_ridge_regression(xs, ys, xq, float("nan"))
    r = torch.tensor([0.5, 0.5, -0.5], dtype=torch.float64, device=device)
    with pytest.raises(ValueError, match="ridge must be >= 0.*batch index 2"):
        kernel_ridge_regression(xs, ys, xq, r)


def test_argument_errors(path):
    xs, ys, xq = make(2, 4, 5, 3, 2)
    with pytest.raises(ValueError, match="support_x must be 2-D or 3-D"):
        kernel_ridge_regression(xs[0, 0], ys, xq, 0.1)
    with pytest.raises(ValueError, match="support_y must be 3-D"):
        kernel_ridge_regression(xs, ys[0], xq, 0.1)
    with pytest.raises(ValueError, match="query_x has feature dimension p = 6"):
        kernel_ridge_regression(xs, ys, torch.randn(2, 3, 6, dtype=torch.float64), 0.1)
    with pytest.raises(ValueError, match="support_y has n = 5"):
        kernel_ridge_regression(xs, torch.randn(2, 5, 2, dtype=torch.float64), xq, 0.1)
    with pytest.raises(ValueError, match="query_x has batch size 1"):
        kernel_ridge_regression(xs, ys, xq[:1], 0.1)
    with pytest.raises(TypeError, match="query_x has dtype float32"):
        kernel_ridge_regression(xs, ys, xq.float(), 0.1)
    with pytest.raises(TypeError, match="support_x must have dtype float32, float64"):
        kernel_ridge_regression(xs.half(), ys.half(), xq.half(), 0.1)
    with pytest.raises(ValueError, match="query_x is on meta"):
        kernel_ridge_regression(xs, ys, torch.empty(2, 3, 5, dtype=torch.float64, device="meta"), 0.1)
    with pytest.raises(ValueError, match=r"ridge must be a float, a 0-d tensor or a tensor of shape \[B\] = \[2\]"):
        kernel_ridge_regression(xs, ys, xq, torch.ones(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="ridge must be a float or a tensor"):
        kernel_ridge_regression(xs, ys, xq, "0.1")
    with pytest.raises(TypeError, match="ridge must be a floating-point tensor"):
        kernel_ridge_regression(xs, ys, xq, torch.ones(2, dtype=torch.long))
    with pytest.raises(TypeError, match="factor must be a KRRFactor"):
        krr_solve(xs, ys)
    f = krr_factor(xs, 0.1)
    with pytest.raises(ValueError, match="rhs has n = 3"):
        krr_solve(f, ys[:, :3])
    with pytest.raises(ValueError, match="rhs must be 3-D"):
        krr_solve(f, ys[0])


@needs_ext
def test_raw_ops_check_arguments():
    xs, ys, xq = make(2, 4, 5, 3, 2)
    r = torch.full((2,), 0.1, dtype=torch.float64)
    ops = torch.ops.ddfast
    with pytest.raises(ValueError, match="support_x must be 3-D"):
        ops.kernel_ridge_regression_forward(xs[0], ys, xq, r)
    with pytest.raises(ValueError, match="ridge must have shape"):
        ops.kernel_ridge_regression_forward(xs, ys, xq, r[:1])
    with pytest.raises(TypeError, match="support_y has dtype"):
        ops.kernel_ridge_regression_forward(xs, ys.float(), xq, r)
    with pytest.raises(ValueError, match="factor must have shape"):
        ops.kernel_ridge_regression_solve(torch.zeros(2, 3, 3, dtype=torch.float64), xs, ys, r)


# ---------------------------------------------------------------------------------------------------------------
# registration: opcheck, torch.compile

@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [5, 80, 140])  # CPU: hand-written / LAPACK; CUDA: shared memory (<= 128) / cuSOLVER
def test_opcheck(device, n):
    if device == "cpu" and n == 140:
        pytest.skip("n = 80 already takes the LAPACK path on CPU")
    ops = torch.ops.ddfast
    xs, ys, xq = make(2, n, 9, 4, 3, device=device)
    r = torch.tensor([0.5, 0.7], dtype=torch.float64, device=device)
    grad = lambda *ts: tuple(t.clone().requires_grad_(True) for t in ts)  # noqa: E731
    torch.library.opcheck(ops.kernel_ridge_regression_forward, (xs, ys, xq, r))
    torch.library.opcheck(ops.kernel_ridge_regression_forward, grad(xs, ys, xq, r))
    pred, alpha, L = ops.kernel_ridge_regression_forward(xs, ys, xq, r)
    G = torch.randn_like(pred)
    for mask in ([True, True, True, True], [False, True, False, False], [True, False, True, False]):
        torch.library.opcheck(ops.kernel_ridge_regression_backward, (G, xs, xq, alpha, L, mask))
    torch.library.opcheck(ops.kernel_ridge_regression_factor, (xs, r))
    torch.library.opcheck(ops.kernel_ridge_regression_predict, (L, xs, ys, xq, r))
    torch.library.opcheck(ops.kernel_ridge_regression_predict, (L,) + grad(xs, ys, xq, r))
    torch.library.opcheck(ops.kernel_ridge_regression_solve, (L, xs, ys, r))
    torch.library.opcheck(ops.kernel_ridge_regression_solve, (L,) + grad(xs, ys, r))
    torch.library.opcheck(ops.kernel_ridge_regression_solve_backward, (ys, L, xs, alpha, [True, True, True]))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(path, device):
    xs, ys, xq = make(2, 6, 10, 4, 3, dtype=torch.float32, device=device, grad=True)

    def fn(xs, ys, xq):
        pred = kernel_ridge_regression(xs, ys, xq, 0.5)
        f = krr_factor(xs, 0.5)
        alpha = krr_solve(f, ys * 2)
        return pred.square().sum() + alpha.sum() + krr_predict(f, ys, xq).sum()

    torch._dynamo.reset()
    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(xs, ys, xq)
    got = torch.autograd.grad(out, (xs, ys, xq))
    ref_out = fn(xs, ys, xq)
    ref = torch.autograd.grad(ref_out, (xs, ys, xq))
    torch.testing.assert_close(out, ref_out)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)


@needs_ext
def test_many_solves_reach_support_x_through_one_product():
    """The solves' gradients w.r.t. the factor's system matrix are summed by autograd and mapped to support_x once:
    the backward's products with support_x ([n, n] x [n, p]) do not grow with the number of solves."""
    def products(k):
        xs, _, _ = make(1, 40, 300, 1, 3, grad=True)
        f = krr_factor(xs, 0.5)
        assert f.system is not None
        total = sum(krr_solve(f, randn((1, 40, 3), dtype=torch.float64, seed=j)).square().sum() for j in range(k))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            total.backward()
        return sum(e.count for e in prof.key_averages(group_by_input_shape=True)
                   if e.key in ("aten::bmm", "aten::mm", "aten::matmul") and "300" in str(e.input_shapes))
    assert products(1) == products(6) >= 1
