"""DATM: time and peak memory per distillation iteration, full unroll (MTT/DATM) vs TESLA, as syn_steps grows.

Every configuration runs in a *fresh subprocess* so that its memory is isolated:

- CPU: after the setup (data, transform, a one-expert buffer, initialisation) and one warm-up iteration, the
  process's resident-set high-water mark is reset (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0) and the
  resident size ``rss0`` is read; after the timed iterations the peak is ``VmHWM - rss0`` from
  ``/proc/self/status`` -- the extra memory one iteration needs on top of what is already resident (model,
  synthetic set, expert snapshots). ``tracemalloc`` would not see torch's allocations, and ``ru_maxrss`` cannot
  be reset, hence this method. Where ``clear_refs`` is unavailable, ``ru_maxrss - rss0`` is used (reported).
- CUDA: ``torch.cuda.max_memory_allocated() - memory_allocated()`` after ``reset_peak_memory_stats``.

Time per iteration: ``benchmarks.harness.time_fn`` over ``DATM.step()`` (median, p20, p80).

The data are random images of Fashion-MNIST's shape (1x28x28, 10 classes) -- the cost of an iteration does not
depend on the pixel values -- and the fixed configuration is DATM's ``quick`` preset for Fashion-MNIST IPC 10
(ConvNet-3 width 32, 100 synthetic images in every inner step) with ``syn_steps`` swept. Rows go to
``benchmarks/results.csv`` (benchmark ``datm_iteration``, provider = gradient mode).

Usage::

    python benchmarks/bench_distill_datm.py                       # CPU, syn_steps 10,20,40,80, both modes
    python benchmarks/bench_distill_datm.py --steps 10,20 --width 128 --device cuda
    python benchmarks/bench_distill_datm.py --steps 10 --modes unroll --experts 5   # + expert training vmap/loop
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from harness import proc_status_kb as _status_kb, reset_peak_rss as _reset_hwm  # noqa: E402


def child(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from harness import quantiles, time_fn

    from ddfast.distill.base import TrainSet
    from ddfast.distill.datm import DATM, preset_config

    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    n_per = 40
    images = torch.rand(10 * n_per, 1, 28, 28, generator=g)
    labels = torch.arange(10).repeat_interleave(n_per)
    train = TrainSet(images, labels, 10, (0.286,), (0.353,), "bench-fmnist-shape")
    cfg = preset_config("quick", "fashion-mnist", args.ipc, syn_steps=args.steps, grad_mode=args.mode,
                        expert={"net": {"width": args.width}, "num_experts": 1, "epochs": 3,
                                "subset_per_class": n_per},
                        sequential_generation=False, min_start_epoch=0, max_start_epoch=1, threshold=1e9,
                        pix_init="real", label_init="first_expert", iterations=10 ** 6)
    d = DATM(cfg, device=dev, quiet=True)
    d.prepare(train)
    d.initialize(train)
    d.step()  # warm-up (allocator, kernels)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        method = "torch.cuda.max_memory_allocated - memory_allocated"
    else:
        ok = _reset_hwm()
        base = _status_kb("VmRSS") * 1024
        method = "VmHWM (clear_refs reset) - VmRSS" if ok else "ru_maxrss - VmRSS (no clear_refs)"
    t0 = time.perf_counter()
    times = time_fn(d.step, dev, warmup=0, repeats=args.repeats, min_time_s=0.0)
    wall = time.perf_counter() - t0
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) - base
    elif method.startswith("VmHWM"):
        peak = _status_kb("VmHWM") * 1024 - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    med, p20, p80 = quantiles(times)
    return {"median_ms": med, "p20_ms": p20, "p80_ms": p80, "peak_bytes": int(peak), "base_bytes": int(base),
            "method": method, "n_iter": len(times), "wall_s": wall, "P": d.experts.num_params,
            "loss": d.history[-1]["loss"] if d.history else None}


def experts_case(args, device: str) -> list:
    """Expert training, K experts x one epoch over 10 x 100 images (batch 256): vmapped vs loop, SGD vs GSAM.
    Time per expert per batch step (ms)."""
    import torch
    from harness import device_name, git_commit

    from ddfast import _extension
    from ddfast.distill.experts import ExpertRecipe, train_experts
    from ddfast.models import NetConfig

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 1, 28, 28, generator=g)
    y = torch.arange(10).repeat(100)
    rows = []
    K = args.experts
    for opt in ("sgd", "gsam"):
        for vm in (True, False):
            r = ExpertRecipe(net=NetConfig(width=args.width), num_experts=K, epochs=1, optimizer=opt, vmap=vm,
                             parallel=K if vm else 1)
            train_experts(r, x[:256], y[:256], 10, device=device)  # warm-up
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                train_experts(r, x, y, 10, device=device)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                times.append((time.perf_counter() - t0) * 1e3 / (K * 4))  # 4 batches per epoch
            times.sort()
            med = times[len(times) // 2]
            print(f"experts {opt:<4} {'vmap' if vm else 'loop':<5} K={K}: {med:8.1f} ms per expert-step")
            rows.append({
                "timestamp": _dt.datetime.now().isoformat(timespec="seconds"), "benchmark": "datm_experts",
                "case": f"fmnist-shape width={args.width} K={K} batch=256 {opt}", "provider": "vmap" if vm else "loop",
                "mode": "fwd+bwd", "dtype": "float32", "device": device.split(":")[0],
                "device_name": device_name(torch.device(device)), "threads": args.threads,
                "median_ms": round(med, 3), "p20_ms": round(times[0], 3), "p80_ms": round(times[-1], 3),
                "speedup_vs_eager": "", "gb_per_s": "", "copy_bw_share": "", "peak_mem_mib": "",
                "config": json.dumps({"unit": "ms per expert per batch step", "loadavg_1m": round(os.getloadavg()[0], 2)}),
                "git_commit": git_commit(), "torch": torch.__version__, "ddfast_extension": _extension.has_extension()})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default=None)
    ap.add_argument("--steps", default="10,20,40,80")
    ap.add_argument("--modes", default="unroll,tesla")
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--experts", type=int, default=0, help="also time expert training with K experts (0: skip)")
    ap.add_argument("--no-csv", action="store_true")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--mode", default="unroll")
    args = ap.parse_args(argv)
    if args.child:
        args.steps = int(args.steps)
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    import torch

    from harness import CSV_FIELDS, append_rows, device_name, git_commit  # noqa: F401

    from ddfast import _extension

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(args.threads)
    rows = []
    load = os.getloadavg()
    print(f"device {device}, {args.threads} threads, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"{'mode':<7} {'syn_steps':>9} {'median s/it':>12} {'p20':>8} {'p80':>8} {'peak MiB':>10}")
    for n in [int(s) for s in args.steps.split(",")]:
        for mode in args.modes.split(","):
            cmd = [sys.executable, os.path.abspath(__file__), "--child", "--mode", mode, "--steps", str(n),
                   "--device", device, "--width", str(args.width), "--ipc", str(args.ipc),
                   "--threads", str(args.threads), "--repeats", str(args.repeats)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if out.returncode != 0 or not line:
                print(f"{mode:<7} {n:>9} failed (rc {out.returncode}): {out.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(line[0][7:])
            print(f"{mode:<7} {n:>9} {r['median_ms'] / 1e3:>12.3f} {r['p20_ms'] / 1e3:>8.3f} "
                  f"{r['p80_ms'] / 1e3:>8.3f} {r['peak_bytes'] / 2**20:>10.1f}")
            cfg = {"syn_steps": n, "grad_mode": mode, "width": args.width, "ipc": args.ipc, "batch_syn": 10 * args.ipc,
                   "P": r["P"], "memory_method": r["method"], "base_mib": round(r["base_bytes"] / 2**20, 1),
                   "iterations_timed": r["n_iter"], "loadavg_1m": round(load[0], 2),
                   "preset": "quick fashion-mnist (random pixels)"}
            rows.append({
                "timestamp": _dt.datetime.now().isoformat(timespec="seconds"), "benchmark": "datm_iteration",
                "case": f"fmnist-shape ipc={args.ipc} width={args.width} syn_steps={n}", "provider": mode,
                "mode": "fwd+bwd", "dtype": "float32", "device": device.split(":")[0],
                "device_name": device_name(torch.device(device)), "threads": args.threads,
                "median_ms": round(r["median_ms"], 3), "p20_ms": round(r["p20_ms"], 3),
                "p80_ms": round(r["p80_ms"], 3), "speedup_vs_eager": "", "gb_per_s": "", "copy_bw_share": "",
                "peak_mem_mib": round(r["peak_bytes"] / 2**20, 1), "config": json.dumps(cfg, sort_keys=True),
                "git_commit": git_commit(), "torch": torch.__version__,
                "ddfast_extension": _extension.has_extension()})
    if args.experts:
        rows += experts_case(args, device)
    if rows and not args.no_csv:
        append_rows(rows)
        print(f"appended {len(rows)} rows to benchmarks/results.csv")
    return rows


if __name__ == "__main__":
    main()
