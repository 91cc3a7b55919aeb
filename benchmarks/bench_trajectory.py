"""Benchmark: trajectory_matching_loss (MTT eq. 2) and tesla_quantities, at the target sizes (DATM's P = 320k and 8M).

Providers: ``ddfast`` (the public op: fused kernel), ``eager`` (the pure-PyTorch reference, the tests' oracle) and
``compile`` (``torch.compile`` of that reference). ``fwd+bwd`` differentiates the student only, as in MTT/DATM (the
expert's parameters are data). Run::

    .venv/bin/python benchmarks/bench_trajectory.py [--device cpu|cuda] [--filter P=320010] [--repeats 30]
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import BenchCase, main_for  # noqa: E402

from ddfast.ops import tesla_quantities, trajectory_matching_loss  # noqa: E402
from ddfast.ops import _reference as R  # noqa: E402

SIZES = [(1, 320_010), (8, 320_010), (1, 8_000_000), (8, 8_000_000)]
GPU_SIZES = [(1, 64_000_000), (4, 64_000_000)]  # the bandwidth target (P >= 64M)

_compiled = {}


def _compiled_ref(name, fn):
    if name not in _compiled:
        _compiled[name] = torch.compile(fn)
    return _compiled[name]


def _loss_inputs(B, P):
    def make(device, dtype, g):
        shape = (P,) if B == 1 else (B, P)
        s = torch.randn(shape, generator=g, device=device, dtype=dtype).requires_grad_(True)
        e = torch.randn(shape, generator=g, device=device, dtype=dtype)
        t = torch.randn(shape, generator=g, device=device, dtype=dtype)
        return s, e, t
    return make


def _tesla_inputs(B, P):
    def make(device, dtype, g):
        shape = (P,) if B == 1 else (B, P)
        e = torch.randn(shape, generator=g, device=device, dtype=dtype)
        t = torch.randn(shape, generator=g, device=device, dtype=dtype)
        G = torch.randn(shape, generator=g, device=device, dtype=dtype)
        lr = torch.full((B,), 0.01, device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        return e, t, G, lr
    return make


def _tesla_ddfast(e, t, G, lr):
    return tesla_quantities(e, t, G, lr if e.dim() == 2 else lr[0])


def _tesla_eager(e, t, G, lr):
    out = R.trajectory.tesla_quantities(e, t, G, lr if e.dim() == 2 else lr[0])
    return out


def cases():
    out = []
    for B, P in SIZES + GPU_SIZES:
        devices = ("cuda",) if (B, P) in GPU_SIZES else ("cpu", "cuda")
        cfg = {"B": B, "P": P}
        out.append(BenchCase(
            benchmark="trajectory_matching_loss", name=f"P={P},B={B}", make_inputs=_loss_inputs(B, P),
            providers={
                "ddfast": trajectory_matching_loss,
                "eager": R.trajectory.trajectory_matching_loss,
                "compile": _compiled_ref("loss", R.trajectory.trajectory_matching_loss),
            },
            # fwd reads s, e, t; bwd reads s, t and writes d_student
            bytes_moved=lambda mode, dt, B=B, P=P: B * P * dt.itemsize * (3 if mode == "fwd" else 6),
            config=cfg, devices=devices, rtol=1e-4, atol=1e-6))
        out.append(BenchCase(
            benchmark="tesla_quantities", name=f"P={P},B={B}", make_inputs=_tesla_inputs(B, P),
            providers={
                "ddfast": _tesla_ddfast,
                "eager": _tesla_eager,
                "compile": _compiled_ref("tesla", _tesla_eager),
            },
            # a reduction pass over (start, target, G) and a pass reading them again and writing v
            bytes_moved=lambda mode, dt, B=B, P=P: B * P * dt.itemsize * 7,
            modes=("fwd",), config=cfg, devices=devices, rtol=1e-4, atol=1e-7))
    return out


if __name__ == "__main__":
    main_for(cases())
