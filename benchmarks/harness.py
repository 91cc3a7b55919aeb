"""One benchmark harness for every ddfast op (and the end-to-end benchmarks).

A benchmark is a list of :class:`BenchCase`. Each case builds fresh random inputs once per provider and
times every provider on them (after checking the provider's result against the reference):

- ``ddfast``  -- the public op in ``ddfast.ops`` (compiled kernel when available),
- ``eager``   -- the pure-PyTorch reference from ``ddfast.ops._reference`` (the tests' oracle),
- ``compile`` -- ``torch.compile`` of that reference.

Modes: ``fwd``, ``fwd+bwd`` (``fwd+bwd`` sums the outputs' float parts against a fixed random
cotangent and calls backward) and ``fwd+bwd+bwd2`` (the gradients are taken with ``create_graph=True`` and a
random linear function of them is back-propagated again: the double backward of an unrolled inner step). Timing: median and the 20th/80th percentiles of many repeats after
warm-up; ``time.perf_counter`` on CPU, CUDA events on a GPU, input buffers rotated so a GPU run never
reads a warm L2. On a GPU the achieved bandwidth (``bytes_moved`` / median time) is also given as a
share of the measured device-to-device copy bandwidth.

Every row is printed and appended to ``benchmarks/results.csv`` (one CSV for all benchmarks).
"""
from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_CSV = os.path.join(HERE, "results.csv")
CSV_FIELDS = [
    "timestamp", "benchmark", "case", "provider", "mode", "dtype", "device", "device_name", "threads",
    "median_ms", "p20_ms", "p80_ms", "speedup_vs_eager", "gb_per_s", "copy_bw_share", "peak_mem_mib",
    "config", "git_commit", "torch", "ddfast_extension",
]


@dataclass
class BenchCase:
    """One op at one size.

    Args:
        benchmark: the op or pipeline name, e.g. ``"trajectory_matching_loss"``.
        name: the size label, e.g. ``"P=320010,B=1"``.
        make_inputs: ``(device, dtype, generator) -> tuple`` of fresh random inputs (never zeros).
            Float inputs that need gradients in ``fwd+bwd`` must be returned with ``requires_grad=True``.
        providers: ``{"ddfast": fn, "eager": fn, ...}``, each called as ``fn(*inputs)``.
        bytes_moved: bytes the op must read and write (per mode), for the bandwidth column.
        modes: which of ``("fwd", "fwd+bwd", "fwd+bwd+bwd2")`` apply.
        dtypes: dtypes to run.
        config: free-form dict stored as JSON in the CSV.
        rtol/atol: tolerance of the pre-timing check against the ``eager`` provider.
        devices: device types the case runs on (e.g. ``("cuda",)`` for sizes that only make sense on a GPU);
            other devices skip it.
        warmup: untimed calls before timing (lower it for providers that take seconds per call).
    """

    benchmark: str
    name: str
    make_inputs: Callable[[torch.device, torch.dtype, torch.Generator], tuple]
    providers: Dict[str, Callable[..., Any]]
    bytes_moved: Optional[Callable[[str, torch.dtype], int]] = None
    modes: Sequence[str] = ("fwd", "fwd+bwd")
    dtypes: Sequence[torch.dtype] = (torch.float32,)
    config: Dict[str, Any] = field(default_factory=dict)
    rtol: float = 1e-4
    atol: float = 1e-5
    devices: Sequence[str] = ("cpu", "cuda")
    warmup: int = 5


def _float_outputs(out) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        out = (out,)
    return [o for o in out if isinstance(o, torch.Tensor) and o.is_floating_point()]


def _leaves(inputs) -> List[torch.Tensor]:
    return [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], device: torch.device, *, warmup: int = 5, repeats: int = 30,
            min_time_s: float = 0.2) -> List[float]:
    """Times ``fn()``; returns the per-call times in milliseconds (at least ``repeats`` samples, more
    until ``min_time_s`` of measurement has accumulated, capped at 10x ``repeats``)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times: List[float] = []
    total = 0.0
    while len(times) < repeats or (total < min_time_s * 1e3 and len(times) < 10 * repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fn()
            ms = (time.perf_counter() - t0) * 1e3
        times.append(ms)
        total += ms
    return times


def quantiles(times: Sequence[float]):
    s = sorted(times)
    pick = lambda q: s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]  # noqa: E731
    return statistics.median(s), pick(0.2), pick(0.8)


_COPY_BW: Dict[str, float] = {}


def copy_bandwidth(device: torch.device) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (read + write counted), cached per device."""
    key = str(device)
    if key not in _COPY_BW:
        n = 256 * 2**20 // 4
        a = torch.empty(n, device=device, dtype=torch.float32).uniform_()
        b = torch.empty_like(a)
        times = time_fn(lambda: b.copy_(a), device, warmup=3, repeats=20)
        med = statistics.median(times) / 1e3
        _COPY_BW[key] = 2 * a.numel() * 4 / med
    return _COPY_BW[key]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    proc = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    proc = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{proc} ({torch.get_num_threads()} threads)"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                              text=True, timeout=5).stdout.strip()
    except Exception:
        return ""


def timed_row(benchmark: str, case: str, provider: str, mode: str, device: torch.device, times_s: Sequence[float],
              baseline_median_s: float, config: Dict[str, Any], threads: int, dtype: str = "float32") -> Dict[str, Any]:
    """A ``results.csv`` row for a provider timed outside :func:`run_case` (whole loops, alternating scripts):
    median and 20th / 80th percentiles of ``times_s`` (seconds) in milliseconds, ``speedup_vs_eager`` =
    ``baseline_median_s`` / this median, and the machine, commit and build fields."""
    from ddfast import _extension

    q = sorted(times_s)
    med = statistics.median(q)
    return {"timestamp": _dt.datetime.now().isoformat(timespec="seconds"), "benchmark": benchmark, "case": case,
            "provider": provider, "mode": mode, "dtype": dtype, "device": device.type,
            "device_name": device_name(device), "threads": threads, "median_ms": round(med * 1e3, 2),
            "p20_ms": round(q[int(0.2 * (len(q) - 1))] * 1e3, 2), "p80_ms": round(q[int(0.8 * (len(q) - 1))] * 1e3, 2),
            "speedup_vs_eager": round(baseline_median_s / med, 3), "gb_per_s": "", "copy_bw_share": "",
            "peak_mem_mib": "", "config": json.dumps(config, sort_keys=True), "git_commit": git_commit(),
            "torch": torch.__version__, "ddfast_extension": _extension.has_extension()}


def append_rows(rows: List[Dict[str, Any]], path: str = RESULTS_CSV):
    """Appends rows to the one results CSV (header written when the file is new)."""
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow(r)


def _check(case: BenchCase, outs: Dict[str, Any]):
    ref = outs.get("eager")
    if ref is None:
        return
    for prov, out in outs.items():
        if prov == "eager":
            continue
        for a, b in zip(_float_outputs(out), _float_outputs(ref)):
            torch.testing.assert_close(a.float(), b.float(), rtol=case.rtol, atol=case.atol,
                                       msg=lambda m: f"{case.benchmark} {case.name}: {prov} != eager: {m}")


def run_case(case: BenchCase, device: torch.device, *, providers: Optional[Sequence[str]] = None,
             repeats: int = 30, seed: int = 0) -> List[Dict[str, Any]]:
    """Runs one case on one device for every dtype, mode and provider; returns CSV rows."""
    from ddfast import _extension

    rows = []
    if device.type not in case.devices:
        return rows
    provs = [p for p in case.providers if providers is None or p in providers]
    for dtype in case.dtypes:
        for mode in case.modes:
            medians: Dict[str, float] = {}
            results: Dict[str, Any] = {}
            per_prov = {}
            for prov in provs:
                fn = case.providers[prov]
                # a few input sets, rotated, so GPU runs do not re-read a warm L2
                nsets = 4 if device.type == "cuda" else 1
                gens = [torch.Generator(device=device).manual_seed(seed + i) for i in range(nsets)]
                sets = [case.make_inputs(device, dtype, g) for g in gens]
                results[prov] = fn(*sets[0])
                it = iter(range(1 << 62))

                if mode == "fwd":
                    def call(fn=fn, sets=sets, it=it):
                        with torch.no_grad():
                            return fn(*sets[next(it) % len(sets)])
                elif mode == "fwd+bwd+bwd2":
                    cots, cots2 = [], []
                    for s in sets:
                        outs = _float_outputs(fn(*s))
                        g = torch.Generator(device=device).manual_seed(seed + 99)
                        cots.append([torch.randn(o.shape, device=device, dtype=o.dtype, generator=g) for o in outs])
                        cots2.append([torch.randn(t.shape, device=device, dtype=t.dtype, generator=g)
                                      for t in _leaves(s)])

                    def call(fn=fn, sets=sets, cots=cots, cots2=cots2, it=it):
                        k = next(it) % len(sets)
                        leaves = _leaves(sets[k])
                        grads = torch.autograd.grad(_float_outputs(fn(*sets[k])), leaves, cots[k], create_graph=True)
                        # a gradient that is constant in the inputs (a bias gradient) has no graph to go through
                        pairs = [(gr, c) for gr, c in zip(grads, cots2[k]) if gr.requires_grad]
                        torch.autograd.backward([p[0] for p in pairs], [p[1] for p in pairs])
                        for t in leaves:
                            t.grad = None
                else:
                    cots = []
                    for s in sets:
                        outs = _float_outputs(fn(*s))
                        g = torch.Generator(device=device).manual_seed(seed + 99)
                        cots.append([torch.randn(o.shape, device=device, dtype=o.dtype, generator=g) for o in outs])

                    def call(fn=fn, sets=sets, cots=cots, it=it):
                        k = next(it) % len(sets)
                        outs = _float_outputs(fn(*sets[k]))
                        leaves = _leaves(sets[k])
                        if leaves:
                            torch.autograd.backward(outs, cots[k])
                            for t in leaves:
                                t.grad = None

                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                try:
                    times = time_fn(call, device, warmup=case.warmup, repeats=repeats)
                except Exception as exc:  # a provider that cannot run this case (e.g. compile failure)
                    print(f"  {case.benchmark} {case.name} {prov} {mode}: skipped ({type(exc).__name__}: {exc})")
                    continue
                med, p20, p80 = quantiles(times)
                medians[prov] = med
                peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
                per_prov[prov] = (med, p20, p80, peak)
            if mode == "fwd":
                _check(case, results)
            for prov, (med, p20, p80, peak) in per_prov.items():
                gbps = share = float("nan")
                if case.bytes_moved is not None:
                    nbytes = case.bytes_moved(mode, dtype)
                    gbps = nbytes / (med / 1e3) / 1e9
                    if device.type == "cuda":
                        share = nbytes / (med / 1e3) / copy_bandwidth(device)
                rows.append({
                    "timestamp": _dt.datetime.now().isoformat(timespec="seconds"),
                    "benchmark": case.benchmark, "case": case.name, "provider": prov, "mode": mode,
                    "dtype": str(dtype).replace("torch.", ""), "device": device.type,
                    "device_name": device_name(device), "threads": torch.get_num_threads(),
                    "median_ms": round(med, 5), "p20_ms": round(p20, 5), "p80_ms": round(p80, 5),
                    "speedup_vs_eager": round(medians["eager"] / med, 3) if "eager" in medians else "",
                    "gb_per_s": round(gbps, 2), "copy_bw_share": round(share, 3), "peak_mem_mib": round(peak, 1),
                    "config": json.dumps(case.config, sort_keys=True), "git_commit": git_commit(),
                    "torch": torch.__version__, "ddfast_extension": _extension.has_extension(),
                })
    return rows


def print_table(rows: List[Dict[str, Any]]):
    """Prints rows as a fixed-width table: one line per (case, mode, dtype, provider)."""
    head = f"{'benchmark':<26} {'case':<34} {'mode':<8} {'dtype':<8} {'provider':<8} {'median ms':>11} {'x eager':>8} {'GB/s':>8} {'bw%':>6}"
    print(head)
    print("-" * len(head))
    for r in rows:
        share = r["copy_bw_share"]
        share_s = "" if share != share else f"{100 * share:5.1f}"
        gb = r["gb_per_s"]
        gb_s = "" if gb != gb else f"{gb:8.1f}"
        print(f"{r['benchmark']:<26} {r['case']:<34} {r['mode']:<8} {r['dtype']:<8} {r['provider']:<8} "
              f"{r['median_ms']:>11.4f} {str(r['speedup_vs_eager']):>8} {gb_s:>8} {share_s:>6}")


def main_for(cases: Sequence[BenchCase], argv=None):
    """Command-line entry shared by every benchmark script: ``--device``, ``--providers``, ``--filter``,
    ``--repeats``, ``--no-csv``."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--providers", default=None, help="comma-separated subset of ddfast,eager,compile")
    ap.add_argument("--filter", default=None, help="substring of 'benchmark case' to run")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--no-csv", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    providers = args.providers.split(",") if args.providers else None
    all_rows = []
    for case in cases:
        if args.filter and args.filter not in f"{case.benchmark} {case.name}":
            continue
        rows = run_case(case, device, providers=providers, repeats=args.repeats)
        print_table(rows)
        all_rows += rows
    if not args.no_csv and all_rows:
        append_rows(all_rows)
        print(f"appended {len(all_rows)} rows to {RESULTS_CSV}")
    return all_rows

# --------------------------------------------------------------------------------------------------------------
# CPU peak memory of one process (Linux): read /proc/self/status fields, reset the resident high-water mark
def proc_status_kb(field: str) -> int:
    """``/proc/self/status`` field (``"VmHWM"``, ``"VmRSS"``) in kB, or -1 where it is missing."""
    import re

    with open("/proc/self/status") as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    return int(m.group(1)) if m else -1


def reset_peak_rss() -> bool:
    """Resets the process's resident-set high-water mark (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0);
    False where that is not possible (then ``ru_maxrss`` is the only peak there is)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
