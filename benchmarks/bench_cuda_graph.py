"""DATM's inner loop captured in a CUDA graph, against the same loop run eagerly (GPU only).

One DATM / MTT iteration at IPC 10 on Fashion-MNIST shapes (ConvNet-3, instance norm, ReLU, average pooling;
100 synthetic images of 1x28x28, soft labels, learnable student learning rate, ``syn_steps`` inner steps over all
images) is a few hundred small kernels per inner step: on a GPU the host's launch overhead, not the arithmetic,
sets its time. A CUDA graph (``torch.cuda.CUDAGraph``, "CUDA Graphs" in the PyTorch docs) records the whole
iteration -- the unrolled forward with ``create_graph=True``, the trajectory-matching loss (Cazenavette et al.
2022, eq. 2) and the backward to the images, labels and learning rate -- once, and replays it with one launch.

Cases: ``unroll`` (MTT's full unroll) and ``tesla`` (TESLA's two passes, Cui et al. 2023, eq. 5-6), at width 32
(the quick presets) and 128 (the papers'), with DSA (Zhao & Bilen 2021) on or off. A graph has fixed shapes and a
fixed sequence of kernels: the batch indices and DSA's uniforms live in static device buffers that a real loop
would refill before each replay, but DSA's mode ``'S'`` picks one augmentation group per call on the host, so the
group sequence is baked into the graph here (one draw, the same in the eager run). A distiller that replays one
graph per iteration needs a group choice made on the device (every group applied with a 0/1 weight) or one graph
per group sequence; this benchmark measures what such a loop would gain.

Checks before timing: the replayed graph's loss and gradients against one eager call's on the same inputs
(relative error printed), next to two eager calls against each other (the GPU's own run-to-run spread: cuDNN's
algorithm choice, TF32 convolutions, atomic additions). Timing: alternating eager call / graph replay, CUDA events, medians. Rows go to
``benchmarks/results.csv`` (``benchmark = cuda_graph_datm``; ``speedup_vs_eager`` = eager median / this median).

    python benchmarks/bench_cuda_graph.py [--widths 32,128] [--modes unroll,tesla] [--iters 20] [--dsa on,off]

On a machine without a GPU the script times the eager loop only (and says so).

This script keeps its own copy of the loop (it also times TESLA, and its figures in ``RESULTS.md`` were measured
with it); the library's version of the unrolled case is DATM's ``cuda_graph=True`` (``ddfast.distill.datm``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Dict, List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import torch  # noqa: E402

import harness  # noqa: E402

C, IPC, HW, SYN_STEPS = 10, 10, 28, 20


def build(width: int, mode: str, dsa_on: bool, device: torch.device, seed: int = 0) -> Callable[[], Tuple]:
    """The iteration as a closure over static tensors; returns ``fn() -> (loss, grad_images, grad_labels,
    grad_lr)`` with no host synchronisation inside (capturable)."""
    from ddfast.augment import DSA, DSAParams
    from ddfast.distill.datm import soft_cross_entropy
    from ddfast.models import convnet_datm, flat_params, functional_forward
    from ddfast.ops import tesla_quantities, trajectory_matching_loss

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = convnet_datm(1, C, im_size=(HW, HW), width=width).to(device)
    theta0 = flat_params(net).detach().clone()
    target = (theta0 + 0.01 * torch.randn(theta0.shape, generator=g).to(device)).detach()
    n = C * IPC
    images = torch.randn(n, 1, HW, HW, generator=g).to(device).requires_grad_(True)
    labels = (torch.nn.functional.one_hot(torch.arange(C).repeat_interleave(IPC), C).float() * 3.0).to(device)
    labels.requires_grad_(True)
    syn_lr = torch.tensor(0.01, device=device, requires_grad=True)
    perms = torch.stack([torch.randperm(n, generator=g) for _ in range(SYN_STEPS)]).to(device)
    dsa = DSA() if dsa_on else None
    steps: List[Tuple[torch.Tensor, object]] = []
    for s in range(SYN_STEPS):
        p = dsa.sample(n, seed=seed * 1000 + s) if dsa_on else None
        steps.append((perms[s], DSAParams(p.groups, p.uniforms.to(device, torch.float32)) if dsa_on else None))

    def batch(imgs, idx, params):
        x = imgs[idx]
        return dsa.apply(x, params) if params is not None else x

    def unroll():
        cur = theta0.clone().requires_grad_(True)
        for idx, params in steps:
            x = batch(images, idx, params)
            loss = soft_cross_entropy(functional_forward(net, cur, x), labels[idx])
            (gr,) = torch.autograd.grad(loss, cur, create_graph=True)
            cur = cur - syn_lr * gr
        L = trajectory_matching_loss(cur, theta0, target, check_finite=False)
        return (L.detach(),) + torch.autograd.grad(L, [images, labels, syn_lr])

    def tesla():
        lr = syn_lr.detach()
        imgs_d, labs_d = images.detach(), labels.detach()
        thetas, theta = [], theta0.clone()
        G = torch.zeros_like(theta0)
        for idx, params in steps:
            thetas.append(theta)
            t = theta.detach().requires_grad_(True)
            loss = soft_cross_entropy(functional_forward(net, t, batch(imgs_d, idx, params)), labs_d[idx])
            (gr,) = torch.autograd.grad(loss, t)
            G = G + gr
            theta = theta - lr * gr
        q = tesla_quantities(theta0, target, G, lr, check_finite=False)
        gi, gl = torch.zeros_like(images), torch.zeros_like(labels)
        for (idx, params), th in zip(steps, thetas):
            t = th.detach().requires_grad_(True)
            loss = soft_cross_entropy(functional_forward(net, t, batch(images, idx, params)), labels[idx])
            (gr,) = torch.autograd.grad(loss, t, create_graph=True)
            a, b = torch.autograd.grad((gr * q.step_vector).sum(), [images, labels])
            gi, gl = gi + a, gl + b
        return q.loss.detach().reshape(()), gi, gl, q.grad_lr.detach().reshape(())

    return unroll if mode == "unroll" else tesla


def capture(fn: Callable[[], Tuple], warmup: int = 3):
    """``(graph, static outputs)``: warm-up on a side stream, then one capture (the PyTorch docs' recipe)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--widths", default="32,128")
    ap.add_argument("--modes", default="unroll,tesla")
    ap.add_argument("--iters", type=int, default=20, help="timed calls of each provider (alternating)")
    ap.add_argument("--dsa", default="on,off", help="comma-separated: on, off")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-csv", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type != "cuda":
        print("no CUDA device: timing the eager loop only (a CUDA graph needs a GPU)")
    rows, report = [], {}
    cases = [(int(w), m, d == "on") for w in args.widths.split(",") for m in args.modes.split(",")
             for d in args.dsa.split(",")]
    for width, mode, dsa_on in cases:
        case = f"w{width} {mode} ipc={IPC} syn_steps={SYN_STEPS} dsa={'on' if dsa_on else 'off'}"
        fn = build(width, mode, dsa_on, dev)
        provs: Dict[str, Callable[[], object]] = {"eager": fn}
        entry: Dict[str, object] = {}
        if dev.type == "cuda":
            try:
                graph, static = capture(fn)
                graph.replay()
                ref, ref2 = fn(), fn()
                torch.cuda.synchronize()
                names = ("loss", "images", "labels", "lr")
                entry["rel_err"] = {k: rel_err(a, b) for k, a, b in zip(names, static, ref)}
                # the run-to-run spread of the eager loop itself (cuDNN / TF32 / atomics), for scale
                entry["rel_err_eager_twice"] = {k: rel_err(a, b) for k, a, b in zip(names, ref2, ref)}
                provs["graph"] = graph.replay
            except Exception as e:  # report why the capture failed, keep timing eager
                entry["capture_error"] = f"{type(e).__name__}: {e}"[:500]
        times = {k: [] for k in provs}
        for fn_ in provs.values():
            fn_()
        for _ in range(args.iters):
            for k, fn_ in provs.items():
                times[k] += harness.time_fn(fn_, dev, warmup=0, repeats=1, min_time_s=0.0)
        base = harness.quantiles(times["eager"])[0] / 1e3
        for k, ts in times.items():
            med = harness.quantiles(ts)[0]
            cfg = {"width": width, "mode": mode, "ipc": IPC, "syn_steps": SYN_STEPS, "batch_syn": C * IPC,
                   "dsa": dsa_on, "soft_labels": True, "image": "1x28x28",
                   **{k_: v for k_, v in entry.items() if k_ in ("rel_err", "rel_err_eager_twice", "capture_error")}}
            rows.append(harness.timed_row("cuda_graph_datm", case, k, "fwd+bwd+bwd2", dev,
                                          [t / 1e3 for t in ts], base, cfg, torch.get_num_threads()))
            entry.setdefault("median_ms", {})[k] = round(med, 3)
        entry["speedup"] = round(entry["median_ms"].get("eager", 0) / entry["median_ms"]["graph"], 3) \
            if "graph" in entry["median_ms"] else None
        report[case] = entry
        print(case, json.dumps(entry), flush=True)
    if not args.no_csv:
        harness.append_rows(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": harness.device_name(dev), "torch": torch.__version__, "cases": report}, f, indent=1)


if __name__ == "__main__":
    main()
