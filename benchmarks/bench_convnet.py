"""Benchmark: the fused ConvNet block (``ddfast.ops.norm_act_pool``: instance norm + ReLU + 2x2 average pooling)
against the eager composite that ``GroupNorm(C, C) -> ReLU -> AvgPool2d(2)`` computes, and ``torch.compile`` of it;
and the first layer's convolution (``ddfast.ops.conv2d``: 3x3, 1 or 3 input channels, direct CPU kernels where they
are faster) against ``torch.nn.functional.conv2d`` ("conv3x3" rows: batch 100 and 256, 1x28x28 with padding 3 as MTT
pads Fashion-MNIST and 3x32x32 with padding 1, 32 and 128 output channels).

One case is the non-convolution part of a whole ConvNet-3 pass: the three blocks' inputs (the three convolutions'
outputs) of a batch, e.g. ``[N, W, 32, 32]``, ``[N, W, 16, 16]``, ``[N, W, 8, 8]`` for 28x28 images padded to 32x32
as MTT does (and 32x32 CIFAR images), or 28, 14, 7 without that padding. Sizes: batch 100 and 256 (distillation
batches, the evaluation batch), width 32 (the quick presets) and 128 (the papers). Modes: forward, forward +
backward, and forward + backward + double backward (DATM's unrolled inner step, TESLA's second pass).

Usage::

    python benchmarks/bench_convnet.py --threads 1 [--device cpu|cuda] [--filter W=128] [--repeats 20]
"""
from __future__ import annotations

import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from harness import BenchCase, main_for  # noqa: E402

from ddfast.ops import _reference as R, conv2d, norm_act_pool  # noqa: E402

SIZES = [(batch, width, chain) for batch in (100, 256) for width in (32, 128) for chain in (32, 28)]


def _inputs(batch, width, chain):
    def make(device, dtype, g):
        out = []
        s = chain
        for _ in range(3):
            x = torch.randn(batch, width, s, s, generator=g, device=device, dtype=dtype).requires_grad_(True)
            w = (torch.rand(width, generator=g, device=device, dtype=dtype) + 0.5).requires_grad_(True)
            b = (0.1 * torch.randn(width, generator=g, device=device, dtype=dtype)).requires_grad_(True)
            out += [x, w, b]
            s //= 2
        return tuple(out)
    return make


def _stack(fn):
    def run(*t):
        return tuple(fn(t[i], t[i + 1], t[i + 2]) for i in (0, 3, 6))
    return run


def _eager(x, w, b):
    return R.norm_act_pool(x, w, b, "relu", 60.0, True, 1e-5)


def _compiled_stack():
    """``torch.compile`` of the reference, one compiled function per block (static shapes, no recompiles)."""
    import torch._functorch.config as fconfig

    fconfig.donated_buffer = False  # the double-backward mode differentiates the compiled backward again
    fns = [torch.compile(_eager, dynamic=False) for _ in range(3)]

    def run(*t):
        return tuple(fns[k](t[3 * k], t[3 * k + 1], t[3 * k + 2]) for k in range(3))
    return run


def cases():
    out = []
    for batch, width, chain in SIZES:
        shapes = [chain, chain // 2, chain // 4]
        elems = sum(batch * width * s * s for s in shapes)
        out.append(BenchCase(
            benchmark="norm_act_pool", name=f"N={batch},W={width},HW={'/'.join(map(str, shapes))}",
            make_inputs=_inputs(batch, width, chain),
            providers={"ddfast": _stack(norm_act_pool), "eager": _stack(_eager), "compile": _compiled_stack()},
            # forward: read x, write a quarter; backward: read x, grad_out, write dx; double: ~3 more passes
            bytes_moved=lambda mode, dt, e=elems: e * dt.itemsize * {"fwd": 1.25, "fwd+bwd": 3.5,
                                                                      "fwd+bwd+bwd2": 8.0}[mode],
            modes=("fwd", "fwd+bwd", "fwd+bwd+bwd2"), config={"batch": batch, "width": width, "sizes": shapes},
            rtol=1e-4, atol=1e-5, warmup=2))
    return out


def _conv_inputs(batch, c_in, width, size):
    def make(device, dtype, g):
        x = torch.randn(batch, c_in, size, size, generator=g, device=device, dtype=dtype).requires_grad_(True)
        w = (0.3 * torch.randn(width, c_in, 3, 3, generator=g, device=device, dtype=dtype)).requires_grad_(True)
        b = (0.1 * torch.randn(width, generator=g, device=device, dtype=dtype)).requires_grad_(True)
        return x, w, b
    return make


def conv_cases():
    out = []
    for batch in (100, 256):
        for c_in, size, pad in ((1, 28, 3), (3, 32, 1)):
            for width in (32, 128):
                ho = size + 2 * pad - 2
                out.append(BenchCase(
                    benchmark="conv3x3", name=f"N={batch},Cin={c_in},W={width},HW={size},pad={pad}",
                    make_inputs=_conv_inputs(batch, c_in, width, size),
                    providers={"ddfast": lambda x, w, b, p=pad: conv2d(x, w, b, padding=p),
                               "eager": lambda x, w, b, p=pad: torch.nn.functional.conv2d(x, w, b, padding=p)},
                    bytes_moved=lambda mode, dt, e=batch * width * ho * ho: e * dt.itemsize * {
                        "fwd": 1.0, "fwd+bwd": 3.0, "fwd+bwd+bwd2": 7.0}[mode],
                    modes=("fwd", "fwd+bwd", "fwd+bwd+bwd2"),
                    config={"batch": batch, "c_in": c_in, "width": width, "size": size, "padding": pad},
                    rtol=1e-4, atol=1e-4, warmup=2))
    return out


if __name__ == "__main__":
    main_for(cases() + conv_cases())
