"""Benchmark: whole training loops on the fused ConvNet (``fused=True``, the default) against the same loops on the
plain ``torch.nn`` modules (``DDFAST_FUSED=0``), alternating in one process:

- ``eval_harness``: :func:`ddfast.evaluate.evaluate_synset` -- the evaluation protocol of every distilled set: 100
  images (IPC 10 on Fashion-MNIST), 300 epochs, 5 runs of a fresh ConvNet-3, DSA, then the 10,000 test images;
- ``expert_training``: :func:`ddfast.distill.experts.train_experts` -- DATM's expert trajectories (GSAM, DSA,
  batch 256) for one expert over a Fashion-MNIST subset.

The images are Fashion-MNIST's when the dataset is installed, random ones of its shape otherwise (the cost does not
depend on the pixel values). Rows go to ``benchmarks/results.csv``. Run::

    python benchmarks/bench_train.py --threads 1 [--rounds 2] [--width 128] [--which eval_harness,expert_training]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import harness  # noqa: E402


def _data(n_per: int):
    from ddfast.data import load_dataset

    try:
        tr, te = load_dataset("fashion-mnist"), load_dataset("fashion-mnist", split="test")
        idx = torch.cat([torch.nonzero(tr.labels == c).flatten()[:n_per] for c in range(10)])
        return tr.images[idx], tr.labels[idx], (te.images, te.labels), "fashion-mnist"
    except Exception:  # noqa: BLE001 - no dataset installed: random images of its shape
        g = torch.Generator().manual_seed(0)
        test = (torch.rand(10000, 1, 28, 28, generator=g), torch.arange(10).repeat(1000))
        return (torch.rand(10 * n_per, 1, 28, 28, generator=g), torch.arange(10).repeat_interleave(n_per), test,
                "random (fashion-mnist shape)")


def _fused(flag: bool):
    os.environ["DDFAST_FUSED"] = "1" if flag else "0"


def eval_harness(width: int, runs: int, epochs: int) -> Dict[str, Callable[[], object]]:
    from ddfast.augment import Normalize
    from ddfast.evaluate import EvalConfig, evaluate_synset

    x, y, test, _ = _data(10)
    tf = Normalize((0.2860,), (0.3530,))
    cfg = EvalConfig(epochs=epochs, num_runs=runs, model_kwargs={"width": width})

    def run(flag):
        def fn():
            _fused(flag)
            return evaluate_synset(x, y, test, config=cfg, transform=tf).mean
        return fn
    return {"ddfast": run(True), "plain": run(False)}


def expert_training(width: int, n_per: int, epochs: int) -> Dict[str, Callable[[], object]]:
    from ddfast.distill.experts import ExpertRecipe, train_experts
    from ddfast.models import NetConfig

    x, y, _, _ = _data(n_per)
    x = (x - 0.2860) / 0.3530
    recipe = ExpertRecipe(net=NetConfig(width=width), num_experts=1, epochs=epochs)

    def run(flag):
        def fn():
            _fused(flag)
            return train_experts(recipe, x, y, 10)
        return fn
    return {"ddfast": run(True), "plain": run(False)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds (each provider once per round)")
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--which", default="eval_harness,expert_training")
    ap.add_argument("--runs", type=int, default=5, help="evaluation runs (eval_harness)")
    ap.add_argument("--epochs", type=int, default=300, help="evaluation epochs (eval_harness)")
    ap.add_argument("--expert-epochs", type=int, default=2)
    ap.add_argument("--expert-per-class", type=int, default=200)
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    _, _, _, data_name = _data(1)
    rows: List[dict] = []
    for which in args.which.split(","):
        if which == "eval_harness":
            provs = eval_harness(args.width, args.runs, args.epochs)
            case = f"{args.runs} runs x {args.epochs} epochs, 100 images, W={args.width}"
        elif which == "expert_training":
            provs = expert_training(args.width, args.expert_per_class, args.expert_epochs)
            case = f"1 expert x {args.expert_epochs} epochs, {10 * args.expert_per_class} images, W={args.width}"
        else:
            raise SystemExit(f"unknown --which {which!r}")
        load0 = [round(v, 2) for v in os.getloadavg()]
        times: Dict[str, List[float]] = {k: [] for k in provs}
        cpu: Dict[str, List[float]] = {k: [] for k in provs}
        for _ in range(args.rounds):
            for k, fn in provs.items():
                c0, t0 = time.process_time(), time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
        _fused(True)
        load1 = [round(v, 2) for v in os.getloadavg()]
        med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        cmed = {k: sorted(v)[len(v) // 2] for k, v in cpu.items()}
        print(f"[{which}] {case}: " + "  ".join(f"{k} {med[k]:.1f} s wall / {cmed[k]:.1f} s CPU" for k in provs) +
              f"  plain/ddfast {med['plain'] / med['ddfast']:.2f}x (CPU {cmed['plain'] / cmed['ddfast']:.2f}x)"
              f"  load {load0} -> {load1}", flush=True)
        for k in provs:
            cfg = {"data": data_name, "threads": args.threads, "rounds": args.rounds, "loadavg_before": load0,
                   "loadavg_after": load1, "cpu_s": [round(v, 2) for v in cpu[k]],
                   "wall_s": [round(v, 2) for v in times[k]]}
            rows.append(harness.timed_row(which, case, k, "train", torch.device("cpu"), times[k],
                                          statistics.median(times["plain"]), cfg, args.threads))
    if not args.no_csv and rows:
        harness.append_rows(rows)


if __name__ == "__main__":
    main()
