"""RCIG: time and peak memory per outer step, and where the time goes (KRR vs network passes).

Every configuration runs in a *fresh subprocess* so that its memory is isolated (the method of
``bench_distill_datm.py``, for comparable numbers):

- CPU peak memory: after the setup (data, transform, pool, initialisation, the inner-lr tuning) and one
  warm-up step, the process's resident-set high-water mark is reset (``echo 5 > /proc/self/clear_refs``,
  Linux >= 4.0) and the resident size ``rss0`` is read; after the timed steps the peak is ``VmHWM - rss0``
  from ``/proc/self/status`` -- the extra memory an outer step needs on top of what is already resident
  (data, pool, support set). ``tracemalloc`` does not see torch's allocations and ``ru_maxrss`` cannot be
  reset, hence this method. Without ``clear_refs``, ``ru_maxrss - rss0`` is used (reported in the row).
- CUDA: ``torch.cuda.max_memory_allocated() - memory_allocated()`` after ``reset_peak_memory_stats``.

Time per outer step: :func:`benchmarks.harness.time_fn` over ``RCIG.step()`` (median, p20, p80): the
meta-gradient (inner solve, outer loss, H^-1 g, implicit gradient, support update) plus the pool model's
1..15 training steps (a random count per step, as in RCIG, so the spread is real).

Share of the time: one more step under ``torch.profiler`` (CPU activities). Each op's *self* time is assigned
to the nearest enclosing label: ``rcig/krr_*`` regions and Cholesky / triangular-solve / ``ddfast::kernel_ridge_
regression*`` ops -> "krr"; ``rcig/net_*`` (primal pass, jvp, vjp), ``rcig/pool_train`` and convolution /
pooling / activation ops and their backward nodes -> "network"; everything else (elementwise glue, optimiser,
GEMMs in the autograd backward that cannot be attributed by name, Python) -> "other". Shares are of the
profiled step's total self time.

The data are random images of Fashion-MNIST's shape (1x28x28, 10 classes) -- the cost does not depend on the
pixel values. Configurations (``--configs``): ``quick`` = RCIG's quick preset at IPC 10 (widths 16/32/64, real
batch 256, 8 inner Adam + 8 CG steps, n = 100), also with the generic ``torch.func.jvp`` linearisation
(``quick-functorch``) and with the reference's Adam Hessian-inverse solver (``quick-hinv-adam``); ``full`` =
the full preset's network and step counts (widths 128/256/512, real batch 1024, 20 + 20 steps) -- for a GPU.

Usage::

    python benchmarks/bench_distill_rcig.py                        # CPU, quick configs
    python benchmarks/bench_distill_rcig.py --configs full --device cuda
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

CONFIGS = {
    "quick": {},
    "quick-functorch": {"linearization": "functorch"},
    "quick-hinv-adam": {"hinv_solver": "adam"},
    "full": {"preset": "full"},
}

_KRR = ("rcig/krr", "cholesky", "triangular", "linalg_solve", "kernel_ridge_regression", "Cholesky", "LinalgSolve",
        "TriangularSolve")
_NET = ("rcig/net", "rcig/pool", "conv", "Conv", "pool", "Pool", "softplus", "Softplus", "sigmoid", "Sigmoid",
        "relu", "Relu", "threshold", "Threshold")


def _classify(ev) -> str:
    e = ev
    while e is not None:
        name = e.name
        if any(k in name for k in _KRR):
            return "krr"
        if any(k in name for k in _NET):
            return "network"
        e = e.cpu_parent
    return "other"


def profile_shares(step) -> dict:
    """Runs ``step()`` once under the profiler; returns ``{"krr": s, "network": s, "other": s}`` (fractions)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    tot = {"krr": 0.0, "network": 0.0, "other": 0.0}
    for ev in prof.events():
        tot[_classify(ev)] += ev.self_cpu_time_total
    s = sum(tot.values()) or 1.0
    return {k: v / s for k, v in tot.items()}


def child(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from harness import quantiles, time_fn

    from ddfast.distill.base import TrainSet
    from ddfast.distill.rcig import RCIG, preset_config

    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    n_per = 300
    images = torch.rand(10 * n_per, 1, 28, 28, generator=g)
    labels = torch.arange(10).repeat_interleave(n_per)
    train = TrainSet(images, labels, 10, (0.286,), (0.353,), "fashion-mnist")
    over = dict(CONFIGS[args.config])
    preset = over.pop("preset", "quick")
    cfg = preset_config(preset, "fashion-mnist", args.ipc, iterations=10 ** 6, **over)
    d = RCIG(cfg, device=dev, quiet=True)
    t0 = time.perf_counter()
    d.prepare(train)
    d.initialize(train)

    seen = []

    def step():
        seen.append(d.step())
        d.iteration += 1

    step()  # warm-up (+ the one-off inner-lr tuning)
    setup_s = time.perf_counter() - t0
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        method = "torch.cuda.max_memory_allocated - memory_allocated"
    else:
        ok = _reset_hwm()
        base = _status_kb("VmRSS") * 1024
        method = "VmHWM (clear_refs reset) - VmRSS" if ok else "ru_maxrss - VmRSS (no clear_refs)"
    times = time_fn(step, dev, warmup=0, repeats=args.repeats, min_time_s=0.0)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) - base
    elif method.startswith("VmHWM"):
        peak = _status_kb("VmHWM") * 1024 - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    shares = profile_shares(step) if dev.type == "cpu" else {}
    med, p20, p80 = quantiles(times)
    return {"median_ms": med, "p20_ms": p20, "p80_ms": p80, "peak_bytes": int(peak), "base_bytes": int(base),
            "method": method, "n_iter": len(times), "setup_s": setup_s, "shares": shares,
            "inner_lr": d.inner_lr, "base_width": cfg.base_width, "real_batch": cfg.real_batch_size,
            "n_inner": cfg.n_inner_steps, "n_hinv": cfg.n_hinv_steps, "hinv_solver": cfg.hinv_solver,
            "linearization": cfg.linearization,
            "pool_steps_mean": sum(h["pool_steps"] for h in seen) / len(seen)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default=None)
    ap.add_argument("--configs", default="quick,quick-functorch,quick-hinv-adam")
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--no-csv", action="store_true")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--config", default="quick")
    args = ap.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    import torch

    from harness import append_rows, device_name, git_commit

    from ddfast import _extension

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(args.threads)
    rows = []
    load = os.getloadavg()
    print(f"device {device}, {args.threads} threads, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"{'config':<16} {'median s/step':>13} {'p20':>7} {'p80':>7} {'peak MiB':>9} {'krr %':>6} {'net %':>6} "
          f"{'other %':>7}")
    for name in args.configs.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--config", name, "--device", device,
               "--ipc", str(args.ipc), "--threads", str(args.threads), "--repeats", str(args.repeats)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode != 0 or not line:
            print(f"{name:<16} failed (rc {out.returncode}): {out.stderr.strip().splitlines()[-3:]}")
            continue
        r = json.loads(line[0][7:])
        sh = r["shares"]
        pct = lambda k: f"{100 * sh[k]:6.1f}" if k in sh else "     -"  # noqa: E731
        print(f"{name:<16} {r['median_ms'] / 1e3:>13.3f} {r['p20_ms'] / 1e3:>7.3f} {r['p80_ms'] / 1e3:>7.3f} "
              f"{r['peak_bytes'] / 2**20:>9.1f} {pct('krr')} {pct('network')} {pct('other'):>7}")
        cfg = {k: r[k] for k in ("base_width", "real_batch", "n_inner", "n_hinv", "hinv_solver", "inner_lr",
                                 "pool_steps_mean")}
        cfg.update({"config": name, "ipc": args.ipc, "n_support": 10 * args.ipc, "memory_method": r["method"],
                    "base_mib": round(r["base_bytes"] / 2**20, 1), "steps_timed": r["n_iter"],
                    "setup_s": round(r["setup_s"], 2), "loadavg_1m": round(load[0], 2),
                    "share_krr": round(sh.get("krr", float("nan")), 4),
                    "share_network": round(sh.get("network", float("nan")), 4),
                    "share_other": round(sh.get("other", float("nan")), 4),
                    "data": "random pixels, fashion-mnist shape"})
        rows.append({
            "timestamp": _dt.datetime.now().isoformat(timespec="seconds"), "benchmark": "rcig_outer_step",
            "case": f"fmnist-shape ipc={args.ipc} {name}", "provider": "ddfast", "mode": "fwd+bwd",
            "dtype": "float32", "device": device.split(":")[0], "device_name": device_name(torch.device(device)),
            "threads": args.threads, "median_ms": round(r["median_ms"], 3), "p20_ms": round(r["p20_ms"], 3),
            "p80_ms": round(r["p80_ms"], 3), "speedup_vs_eager": "", "gb_per_s": "", "copy_bw_share": "",
            "peak_mem_mib": round(r["peak_bytes"] / 2**20, 1), "config": json.dumps(cfg, sort_keys=True),
            "git_commit": git_commit(), "torch": torch.__version__, "ddfast_extension": _extension.has_extension()})
    if rows and not args.no_csv:
        append_rows(rows)
        print(f"appended {len(rows)} rows to benchmarks/results.csv")
    return rows


if __name__ == "__main__":
    main()
