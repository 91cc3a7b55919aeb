"""Benchmark: kernel_ridge_regression (RCIG's batched linear-kernel KRR) at the target sizes (RCIG's support sets), plus the
factor-reuse pattern of RCIG's inner loop.

Providers: ``ddfast`` (the public op), ``eager`` (the pure-PyTorch reference: ``X_s X_s^T``, ``X_q X_s^T``,
``torch.linalg.cholesky_ex`` and ``torch.cholesky_solve``, differentiated by autograd), ``compile``
(``torch.compile`` of that reference). ``fwd+bwd`` differentiates support_x, support_y and query_x. Run::

    .venv/bin/python benchmarks/bench_krr.py [--device cpu|cuda] [--filter n=500] [--repeats 30]
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import BenchCase, main_for  # noqa: E402

from ddfast.ops import kernel_ridge_regression  # noqa: E402
from ddfast.ops import _reference as R  # noqa: E402
from ddfast.ops.krr import krr_factor, krr_solve  # noqa: E402

# (B, n, p, m, C)
SIZES = [(30, 20, 2048, 256, 10), (8, 100, 2048, 256, 10), (1, 500, 8192, 1024, 10)]
GPU_SIZES = [(1024, 20, 512, 64, 10), (1024, 64, 512, 64, 10)]  # the GPU target: n <= 64, B = 1024
RIDGE = 0.1
INNER_STEPS = 20  # RCIG: 20 inner steps per outer step, one K_ss

_compiled = {}


def _compiled_ref():
    if "krr" not in _compiled:
        _compiled["krr"] = torch.compile(R.krr.kernel_ridge_regression)
    return _compiled["krr"]


def _inputs(B, n, p, m, C):
    def make(device, dtype, g):
        xs = (torch.randn(B, n, p, generator=g, device=device, dtype=dtype) * p ** -0.5).requires_grad_(True)
        ys = torch.randn(B, n, C, generator=g, device=device, dtype=dtype).requires_grad_(True)
        xq = (torch.randn(B, m, p, generator=g, device=device, dtype=dtype) * p ** -0.5).requires_grad_(True)
        ridge = torch.full((B,), RIDGE, device=device, dtype=dtype)
        return xs, ys, xq, ridge
    return make


def _ddfast(xs, ys, xq, ridge):
    return kernel_ridge_regression(xs, ys, xq, ridge)


def _eager(xs, ys, xq, ridge):
    return R.krr.kernel_ridge_regression(xs, ys, xq, ridge)


def _compile(xs, ys, xq, ridge):
    return _compiled_ref()(xs, ys, xq, ridge)


# RCIG's inner loop: INNER_STEPS solves against one K_ss with changing right-hand sides (Y_s - u_s(psi)).
def _inner_ddfast(xs, ys, xq, ridge):
    f = krr_factor(xs, ridge)
    return sum(krr_solve(f, ys * (1.0 + 0.01 * k)).sum() for k in range(INNER_STEPS))


def _inner_eager(xs, ys, xq, ridge):  # what the JAX code does: a fresh dense solve per step
    n = xs.shape[1]
    A = xs @ xs.mT + ridge[:, None, None] * torch.eye(n, device=xs.device, dtype=xs.dtype)
    return sum(torch.linalg.solve(A, ys * (1.0 + 0.01 * k)).sum() for k in range(INNER_STEPS))


def cases():
    out = []
    for (B, n, p, m, C) in SIZES + GPU_SIZES:
        devices = ("cuda",) if (B, n, p, m, C) in GPU_SIZES else ("cpu", "cuda")
        cfg = {"B": B, "n": n, "p": p, "m": m, "C": C, "ridge": RIDGE}
        out.append(BenchCase(
            benchmark="kernel_ridge_regression", name=f"B={B},n={n},p={p},m={m},C={C}",
            make_inputs=_inputs(B, n, p, m, C),
            providers={"ddfast": _ddfast, "eager": _eager, "compile": _compile},
            config=cfg, devices=devices, rtol=2e-3, atol=2e-4))
    for (B, n, p, m, C) in [(1, 200, 8192, 1, 10), (1, 1000, 8192, 1, 10)]:  # CIFAR-10 IPC10 / IPC50 (flipped)
        out.append(BenchCase(
            benchmark="krr_inner_solves", name=f"{INNER_STEPS}x,B={B},n={n},p={p},C={C}",
            make_inputs=_inputs(B, n, p, m, C),
            providers={"ddfast": _inner_ddfast, "eager": _inner_eager},
            config=dict(B=B, n=n, p=p, C=C, steps=INNER_STEPS, ridge=RIDGE), rtol=2e-3, atol=2e-3))
    return out


if __name__ == "__main__":
    main_for(cases())
