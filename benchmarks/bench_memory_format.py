"""Benchmark: ConvNet-3 in the channels-last memory format against the default (contiguous NCHW), alternating in
one process. Does storing activations as NHWC (``model.to(memory_format=torch.channels_last)`` and a channels-last
input, the PyTorch tutorial "Channels Last Memory Format in PyTorch") make the distillers' network step cheaper?

One step on a batch of Fashion-MNIST-shaped images ``[N, 1, 28, 28]`` (MTT's first-layer padding 3), cross-entropy
on random labels:

- ``fwd+bwd``: forward and backward to the parameters (the evaluation harness, expert training, DANCE's pool);
- ``fwd+bwd+bwd2``: the parameter gradients with ``create_graph=True``, then a backward of their squared norm to
  the parameters and the images (DATM's unrolled inner step, TESLA's second pass).

Networks: the fused ConvNet (``fused=True``, the default) and the plain ``torch.nn`` modules (``fused=False``).
Time: process CPU seconds (``time.process_time``) and wall seconds per step, medians over ``--rounds`` alternating
rounds after one warm-up; CPU seconds are the figure to read on a shared machine. On CUDA the wall time after a
synchronise is used for both. Before timing, each format's parameter gradients are compared with a float64 copy of
the network: the largest deviation relative to the largest entry is printed and stored (float32 rounding, and a
pre-activation that changes sign between float32 and float64 moves a ReLU gradient by a whole unit); above
``MAX_ERROR`` the benchmark stops. Rows go to ``benchmarks/results.csv`` (benchmark ``memory_format``, provider
``contiguous`` or ``channels_last``, ``speedup_vs_eager`` = contiguous / provider). Run::

    python benchmarks/bench_memory_format.py --threads 1 [--device cpu|cuda] [--widths 32,128] [--rounds 5]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from typing import Dict, List

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import harness  # noqa: E402

#: a format whose gradients deviate from float64 by more than this (relative to the largest entry) is a bug
MAX_ERROR = 1e-2
MODES = ("fwd+bwd", "fwd+bwd+bwd2")
FORMATS = ("contiguous", "channels_last")


def _step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str) -> None:
    params = list(model.parameters())
    loss = torch.nn.functional.cross_entropy(model(x), y)
    if mode == "fwd+bwd":
        torch.autograd.backward(loss, inputs=params)
        return
    grads = torch.autograd.grad(loss, params, create_graph=True)
    torch.autograd.backward(sum((g * g).sum() for g in grads), inputs=params + [x])


def _reference_grads(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str) -> List[torch.Tensor]:
    """The step's parameter gradients in float64 (a double copy of ``model``, contiguous)."""
    m64 = copy.deepcopy(model).to(dtype=torch.float64, memory_format=torch.contiguous_format)
    x64 = x.detach().to(dtype=torch.float64, memory_format=torch.contiguous_format).requires_grad_(True)
    _step(m64, x64, y, mode)
    return [p.grad.detach() for p in m64.parameters()]


def _error(grads: List[torch.Tensor], ref: List[torch.Tensor]) -> float:
    """Largest deviation from the float64 gradients, relative to the largest float64 gradient entry (a conv bias
    before instance norm has a gradient that is zero up to rounding, so a per-tensor relative error would mean
    nothing)."""
    scale = max(float(r.abs().max()) for r in ref)
    return max(float((g.double() - r).abs().max()) for g, r in zip(grads, ref)) / scale


def _pair(width: int, fused: bool, batch: int, device: torch.device):
    """``{format: (model, x)}``: the same weights and images in both memory formats."""
    from ddfast.models import ConvNet

    torch.manual_seed(0)
    base = ConvNet(1, 10, width=width, im_size=(28, 28), fused=fused).to(device)
    x = torch.randn(batch, 1, 28, 28, device=device)
    out = {}
    for fmt in FORMATS:
        m = ConvNet(1, 10, width=width, im_size=(28, 28), fused=fused).to(device)
        m.load_state_dict(base.state_dict())
        mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
        m = m.to(memory_format=mf)
        out[fmt] = (m, x.detach().contiguous(memory_format=mf).requires_grad_(True))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--widths", default="32,128")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds after one warm-up round")
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    y = torch.randint(0, 10, (args.batch,), generator=torch.Generator().manual_seed(1)).to(device)
    rows: List[dict] = []
    for width in [int(w) for w in args.widths.split(",")]:
        for fused in (True, False):
            nets = _pair(width, fused, args.batch, device)
            for mode in MODES:
                load0 = [round(v, 2) for v in os.getloadavg()]
                wall: Dict[str, List[float]] = {k: [] for k in FORMATS}
                cpu: Dict[str, List[float]] = {k: [] for k in FORMATS}
                grads: Dict[str, List[torch.Tensor]] = {}
                for r in range(args.rounds + 1):
                    for fmt in FORMATS:
                        model, x = nets[fmt]
                        harness._sync(device)
                        c0, t0 = time.process_time(), time.perf_counter()
                        _step(model, x, y, mode)
                        harness._sync(device)
                        if r:  # round 0 warms up and keeps the gradients for the float64 comparison below
                            wall[fmt].append(time.perf_counter() - t0)
                            cpu[fmt].append(time.process_time() - c0)
                        else:
                            grads[fmt] = [p.grad.detach().clone() for p in model.parameters()]
                        model.zero_grad(set_to_none=True)
                        x.grad = None
                    if not r:
                        ref = _reference_grads(nets["contiguous"][0], nets["contiguous"][1], y, mode)
                        errs = {k: _error(grads[k], ref) for k in FORMATS}
                        if max(errs.values()) > MAX_ERROR:
                            raise AssertionError(f"W={width} fused={fused} {mode}: gradients off the float64 "
                                                 f"reference by {errs} (relative to the largest entry)")
                load1 = [round(v, 2) for v in os.getloadavg()]
                key = cpu if device.type == "cpu" else wall
                med = {k: statistics.median(v) for k, v in key.items()}
                case = f"N={args.batch},W={width},{'fused' if fused else 'plain'}"
                print(f"[memory_format] {case} {mode}: " + "  ".join(
                    f"{k} {med[k] * 1e3:.1f} ms" for k in FORMATS) +
                    f"  contiguous/channels_last {med['contiguous'] / med['channels_last']:.2f}x"
                    f" ({'CPU' if device.type == 'cpu' else 'wall'} time)  gradient error vs float64 " +
                    "/".join(f"{errs[k]:.1e}" for k in FORMATS) + f"  load {load0} -> {load1}", flush=True)
                for k in FORMATS:
                    cfg = {"batch": args.batch, "width": width, "fused": fused, "rounds": args.rounds,
                           "grad_error_vs_float64": errs[k],
                           "time": "process_cpu" if device.type == "cpu" else "wall",
                           "loadavg_before": load0, "loadavg_after": load1,
                           "wall_ms": [round(v * 1e3, 1) for v in wall[k]]}
                    rows.append(harness.timed_row("memory_format", case, k, mode, device, key[k], med["contiguous"],
                                                  cfg, args.threads))
    if not args.no_csv and rows:
        harness.append_rows(rows)


if __name__ == "__main__":
    main()
