"""Seeded fuzz of every op family: the compiled kernel and the pure-PyTorch reference must agree.

Each case draws an op, shapes (empty ones included), a dtype, a memory layout (contiguous, transposed or
strided views) and a value regime (ordinary, tiny around 1e-12, huge around 1e11, all zero, constant, a
single NaN or inf), calls the public op once on the kernel and once with the kernel switched off (the
reference / fallback path), and asserts that

- both raise, with the same exception type, or neither does;
- without an error, every output agrees to a tolerance of the dtype, relative to the output's magnitude.

The cases are the same in every run (one generator per case index), so a failure names a reproducible
case. Skipped without the compiled extension (then both paths are the reference).
"""
from __future__ import annotations

import math

import pytest
import torch

import ddfast._extension as ext
import ddfast.ops as ops
from ddfast.ops import trust as trust_mod

pytestmark = pytest.mark.skipif(not ext.has_extension(), reason="needs the compiled extension")

N_CASES = 400
REGIMES = ("normal", "normal", "normal", "tiny", "huge", "zero", "const", "nan", "inf")


def _values(g: torch.Generator, shape, dtype, regime: str, scale: float = 1.0) -> torch.Tensor:
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    if regime == "tiny":
        x = x * 1e-12
    elif regime == "huge":
        x = x * (1e11 if dtype == torch.float32 else 1e100)
    elif regime == "zero":
        x = torch.zeros(shape, dtype=torch.float64)
    elif regime == "const":
        x = torch.full(shape, 0.37, dtype=torch.float64)
    elif regime in ("nan", "inf") and x.numel():
        flat = x.view(-1)
        flat[int(torch.randint(0, flat.numel(), (1,), generator=g))] = math.nan if regime == "nan" else math.inf
    return x.to(dtype)


def _layout(g: torch.Generator, x: torch.Tensor) -> torch.Tensor:
    """The same values as a contiguous tensor, a strided view or (2-D and more) a transposed copy's view."""
    kind = int(torch.randint(0, 3, (1,), generator=g))
    if kind == 1:  # every other element of a larger buffer
        big = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype) if x.dim() else x.clone()
        if x.dim():
            big[..., ::2] = x
            return big[..., ::2]
    if kind == 2 and x.dim() >= 2:
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    return x.contiguous()


def _case(i: int):
    """-> (name, regime, thunk[, atol]): thunk() calls the public op on case i's inputs and returns a tuple of
    tensors; atol, when given, is an absolute tolerance the case's conditioning needs on top of the relative one."""
    g = torch.Generator().manual_seed(1000 + i)
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    dtype = (torch.float32, torch.float64)[r(0, 1)]
    regime = REGIMES[r(0, len(REGIMES) - 1)]
    op = ("trajectory", "tesla", "krr", "sample_stats", "gmm", "anchor", "norm_act_pool", "conv2d")[i % 8]
    if op in ("trajectory", "tesla"):
        shape = (r(1, 3), r(0, 40)) if r(0, 1) else (r(0, 40),)
        start = _layout(g, _values(g, shape, dtype, "normal"))
        target = _layout(g, start + _values(g, shape, dtype, "normal", 0.1) + 0.01)
        third = _layout(g, _values(g, shape, dtype, regime))
        if op == "trajectory":
            return op, regime, lambda: (ops.trajectory_matching_loss(third, start, target),)
        lr = float(torch.rand((), generator=g)) * 0.1 + 1e-3
        return op, regime, lambda: tuple(ops.tesla_quantities(start, target, third, lr))
    if op == "krr":
        b, n, m, p, k = r(1, 2), r(1, 12), r(0, 6), r(1, 16), r(1, 4)
        xs = _layout(g, _values(g, (b, n, p), dtype, regime) / math.sqrt(p))
        ys = _layout(g, _values(g, (b, n, k), dtype, "normal"))
        xq = _layout(g, _values(g, (b, m, p), dtype, "normal") / math.sqrt(p))
        ridge = 10 ** float(torch.empty(()).uniform_(-2, 1, generator=g))
        return op, regime, lambda: (ops.kernel_ridge_regression(xs, ys, xq, ridge),)
    if op == "sample_stats":
        n, c = r(0, 30), r(1, 6)
        logits = _layout(g, _values(g, (n, c), dtype, regime, 3.0))
        labels = torch.randint(0, c, (n,), generator=g)
        # margin = p_y - max p_k: a difference of probabilities, so its rounding is absolute (relative to 1)
        return op, regime, lambda: tuple(ops.sample_stats(logits, labels)), 16 * torch.finfo(dtype).eps
    if op == "gmm":
        n, c = r(0, 60), r(1, 4)
        v = _values(g, (n,), dtype, regime)
        labels = torch.randint(0, c, (n,), generator=g)
        if regime == "normal" and n:  # a well-separated bimodal class mixture
            v = v * 0.1 + (torch.rand(n, generator=g) < 0.3).to(dtype) * 2
        v = _layout(g, v)
        iters = r(0, 30)
        return op, regime, lambda: tuple(ops.classwise_gmm(v, labels, c, num_iters=iters))
    if op == "anchor":
        n, a, d = r(0, 20), r(1, 5), r(1, 8)
        feats = _layout(g, _values(g, (n, d), dtype, regime))
        anchors = _layout(g, _values(g, (a, d), dtype, "normal"))
        return op, regime, lambda: tuple(ops.anchor_distances(feats, anchors))
    if op == "conv2d":  # grayscale 3x3: the direct CPU kernels
        n, cout, h, pad = r(0, 3), r(1, 6), r(1, 9), r(0, 3)
        x = _layout(g, _values(g, (n, 1, h, h + r(0, 2)), dtype, regime))
        w = _values(g, (cout, 1, 3, 3), dtype, "normal")
        bias = _values(g, (cout,), dtype, "normal") if r(0, 1) else None
        return op, regime, lambda: (ops.conv2d(x, w, bias, 1, pad),)
    n, c, h = r(1, 3), r(1, 4), 2 * r(1, 4)
    x = _layout(g, _values(g, (n, c, h, h), dtype, regime))
    w = _values(g, (c,), dtype, "normal") * 0.1 + 1
    bias = _values(g, (c,), dtype, "normal") * 0.1
    act = ("relu", "softplus")[r(0, 1)]
    pool = bool(r(0, 1))
    # a (nearly) constant plane: x - mean is rounding noise, amplified by 1 / sqrt(var + eps) <= 1 / sqrt(1e-5);
    # the two backends round the mean differently, so allow that much absolute error
    fin = x[torch.isfinite(x)]
    atol = 8 * torch.finfo(dtype).eps * (float(fin.abs().max()) if fin.numel() else 0.0) / math.sqrt(1e-5)
    return op, regime, lambda: (ops.norm_act_pool(x, w, bias, act=act, pool=pool),), atol


def _run(thunk):
    try:
        with torch.no_grad():
            return [t.detach().clone() if isinstance(t, torch.Tensor) else t for t in thunk()], None
    except Exception as exc:  # noqa: BLE001 -- the type is what is compared
        return None, exc


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = 0.0) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return bool(torch.equal(a, b))
    a64, b64 = a.double(), b.double()
    same_nonfinite = (torch.equal(torch.isnan(a64), torch.isnan(b64))
                      and torch.equal(a64.isinf() & (a64 > 0), b64.isinf() & (b64 > 0))
                      and torch.equal(a64.isinf() & (a64 < 0), b64.isinf() & (b64 < 0)))
    if not same_nonfinite:
        return False
    fin = torch.isfinite(b64)
    if not fin.any():
        return True
    rtol = 2e-4 if a.dtype == torch.float32 else 1e-9
    scale = b64[fin].abs().max().item()
    return bool(((a64[fin] - b64[fin]).abs() <= rtol * scale + rtol * 1e-30 + atol).all())


@pytest.mark.parametrize("block", range(8))  # block b: cases i = b (mod 8), i.e. one op, 50 cases
def test_kernel_and_reference_agree_on_fuzzed_inputs(block, monkeypatch):
    mismatches = []
    for i in range(block, N_CASES, 8):
        name, regime, thunk, *rest = _case(i)
        atol = rest[0] if rest else 0.0
        out_k, err_k = _run(thunk)
        with monkeypatch.context() as m:
            m.setattr(ext, "use_kernel", lambda *a: False)
            m.setattr(trust_mod, "_use_kernel", lambda *a: False)
            out_r, err_r = _run(thunk)
        if (err_k is None) != (err_r is None) or (err_k is not None and type(err_k) is not type(err_r)):
            mismatches.append(f"case {i} ({name}, {regime}): kernel {err_k!r} vs reference {err_r!r}")
            continue
        if err_k is None:
            bad = [j for j, (a, b) in enumerate(zip(out_k, out_r)) if not _close(a, b, atol)]
            if bad or len(out_k) != len(out_r):
                mismatches.append(f"case {i} ({name}, {regime}): outputs {bad} differ")
    assert not mismatches, "\n".join(mismatches)
