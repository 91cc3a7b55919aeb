"""Benchmark: the per-sample trust-scoring ops of TAD (sample_stats, classwise_gmm, anchor_distances) at the sizes
of the speed targets (RESULTS.md).

Providers: ``ddfast`` (the public op: compiled kernel), ``eager`` (the pure-PyTorch reference, the tests' oracle),
``compile`` (``torch.compile`` of that reference) and, for classwise_gmm, ``sklearn`` (scikit-learn's
``GaussianMixture(2)`` fitted class by class from the same initialisation: what DivideMix-style code does).
Every GMM provider runs exactly 20 EM iterations (``tol=0``) from the same per-class initialisation, so their
outputs agree and the check before timing compares them. The ops have no gradient (anchor_distances aside), so
only ``fwd`` is timed. Run::

    .venv/bin/python benchmarks/bench_trust.py [--device cpu|cuda] [--filter sample_stats] [--providers ddfast,eager]
        [--repeats N] [--threads T] [--clock wall|process] [--no-csv]

At the end a summary prints each target ratio (sample_stats >= 3x eager, classwise_gmm >= 3x
eager and >= 20x the per-class scikit-learn loop) with its measured value.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import RESULTS_CSV, BenchCase, append_rows, print_table, run_case  # noqa: E402

from ddfast.ops import anchor_distances, classwise_gmm, sample_stats  # noqa: E402
from ddfast.ops._reference import trust as R  # noqa: E402

GMM_ITERS = 20
REG_COVAR = 1e-6

# The harness builds the inputs once per provider from the same seed; big inputs are cached so that two copies of
# a 5 GB logits tensor never coexist (the cached tensors are identical to what a fresh call would build).
_cache = {}


def _cached(key, make):
    if key not in _cache:
        _cache.clear()
        _cache[key] = make()
    return _cache[key]


_compiled = {}


def _compiled_ref(name):
    if name not in _compiled:
        _compiled[name] = torch.compile(getattr(R, name))
    return _compiled[name]


# ------------------------------------------------------------------------------------------------------------------
# sample_stats
def _stats_inputs(N, C):
    def make(device, dtype, g):
        def build():
            z = torch.empty(N, C, device=device, dtype=dtype)
            for s in range(0, N, 1 << 16):  # chunked: no float32 temporary of the whole tensor
                e = min(N, s + (1 << 16))
                z[s:e] = (3.0 * torch.randn(e - s, C, generator=g, device=device)).to(dtype)
            y = torch.randint(0, C, (N,), generator=g, device=device)
            return z, y
        return _cached(("stats", N, C, str(device), dtype, g.initial_seed()), build)
    return make


def _stats_bytes(N, C):
    return lambda mode, dtype: N * C * torch.finfo(dtype).bits // 8 + N * 8 + 3 * N * 4 + N * 8


def stats_cases():
    cases = []
    for N, C in [(60_000, 10), (50_000, 100), (1_280_000, 1000)]:
        cases.append(BenchCase(
            benchmark="sample_stats", name=f"N={N},C={C}", make_inputs=_stats_inputs(N, C),
            providers={"ddfast": lambda z, y: tuple(sample_stats(z, y)), "eager": R.sample_stats,
                       "compile": lambda z, y: _compiled_ref("sample_stats")(z, y)},
            bytes_moved=_stats_bytes(N, C), modes=("fwd",), config={"N": N, "C": C}, rtol=1e-4, atol=1e-5,
            warmup=1 if N * C > 10**8 else 5))
    return cases


# ------------------------------------------------------------------------------------------------------------------
# classwise_gmm
def _gmm_inputs(N, C):
    def make(device, dtype, g):
        def build():
            # loss-like values: per class a low mode (clean) and a 25% high mode (noisy), class-dependent offsets
            y = torch.randint(0, C, (N,), generator=g, device=device)
            noisy = torch.rand(N, generator=g, device=device) < 0.25
            base = torch.rand(C, generator=g, device=device)[y]
            v = torch.where(noisy, 3.0 + 0.8 * torch.randn(N, generator=g, device=device),
                            0.3 * torch.rand(N, generator=g, device=device)) + base
            v = v.to(dtype)
            w, mu, var = R.gmm_init(v, y, C, "mean_split", REG_COVAR)
            return v, y, w, mu, var
        return _cached(("gmm", N, C, str(device), dtype, g.initial_seed()), build)
    return make


def _gmm_ddfast(C):
    def fn(v, y, w, mu, var):
        return tuple(classwise_gmm(v, y, C, GMM_ITERS, tol=0.0, reg_covar=REG_COVAR, init=(w, mu, var)))
    return fn


def _gmm_eager(C):
    def fn(v, y, w, mu, var):
        return R.classwise_gmm(v, y, C, GMM_ITERS, 0.0, REG_COVAR, w, mu, var)[:4]
    return fn


def _gmm_compile(C):
    def fn(v, y, w, mu, var):
        return _compiled_ref("classwise_gmm")(v, y, C, GMM_ITERS, 0.0, REG_COVAR, w, mu, var)[:4]
    return fn


def _gmm_sklearn(C):
    """Per-class scikit-learn loop from the same initialisation (exactly GMM_ITERS iterations, tol=0)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    def fn(v, y, w, mu, var):
        # float64, as DivideMix-style code feeds it (scikit-learn rejects float32 weights_init that do not sum to 1
        # within 1e-8)
        x = v.cpu().double().numpy()
        lab = y.cpu().numpy()
        w0, mu0, var0 = (t.cpu().double().numpy() for t in (w, mu, var))
        w0 = w0 / w0.sum(axis=1, keepdims=True)  # float32 weights widened: renormalise (a 1e-8 change)
        post = np.zeros_like(x)
        W, M, V = np.empty((C, 2), x.dtype), np.empty((C, 2), x.dtype), np.empty((C, 2), x.dtype)
        order_idx = np.argsort(lab, kind="stable")
        bounds = np.searchsorted(lab[order_idx], np.arange(C + 1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            for c in range(C):
                idx = order_idx[bounds[c]:bounds[c + 1]]
                X = x[idx].reshape(-1, 1)
                gm = GaussianMixture(2, covariance_type="full", tol=0.0, reg_covar=REG_COVAR, max_iter=GMM_ITERS,
                                     weights_init=w0[c], means_init=mu0[c].reshape(2, 1),
                                     precisions_init=(1.0 / var0[c]).reshape(2, 1, 1)).fit(X)
                o = np.argsort(gm.means_[:, 0], kind="stable")
                W[c], M[c], V[c] = gm.weights_[o], gm.means_[o, 0], gm.covariances_.reshape(2)[o]
                post[idx] = gm.predict_proba(X)[:, o[0]]
        dev = v.device
        return tuple(torch.from_numpy(a).to(dev, v.dtype) for a in (post, W, M, V))
    return fn


def gmm_cases():
    cases = []
    for N, C in [(60_000, 10), (1_280_000, 1000)]:
        cases.append(BenchCase(
            benchmark="classwise_gmm", name=f"N={N},C={C},iters={GMM_ITERS}", make_inputs=_gmm_inputs(N, C),
            providers={"ddfast": _gmm_ddfast(C), "eager": _gmm_eager(C), "compile": _gmm_compile(C),
                       "sklearn": _gmm_sklearn(C)},
            modes=("fwd",), config={"N": N, "C": C, "iters": GMM_ITERS, "init": "mean_split"},
            rtol=1e-3, atol=1e-3, warmup=1 if C > 100 else 5))
    return cases


# ------------------------------------------------------------------------------------------------------------------
# anchor_distances
def _anchor_inputs(N, D, C, with_p):
    def make(device, dtype, g):
        def build():
            f = torch.randn(N, D, generator=g, device=device, dtype=dtype).abs_()  # ReLU-like features
            a = torch.randn(C, D, generator=g, device=device, dtype=dtype).abs_()
            if not with_p:
                return f, a, None
            m = torch.randn(D, D, generator=g, device=device, dtype=dtype) / D ** 0.5
            p = m @ m.T + 0.1 * torch.eye(D, device=device, dtype=dtype)
            return f, a, p
        return _cached(("anchor", N, D, C, with_p, str(device), dtype, g.initial_seed()), build)
    return make


def anchor_cases():
    cases = []
    N, D, C = 60_000, 2048, 10
    for with_p in (False, True):
        cases.append(BenchCase(
            benchmark="anchor_distances", name=f"N={N},D={D},C={C},{'precision' if with_p else 'euclidean'}",
            make_inputs=_anchor_inputs(N, D, C, with_p),
            providers={"ddfast": lambda f, a, p: tuple(anchor_distances(f, a, p)),
                       "eager": lambda f, a, p: R.anchor_distances(f, a, p, 1e-8),
                       "compile": lambda f, a, p: _compiled_ref("anchor_distances")(f, a, p, 1e-8)},
            bytes_moved=lambda mode, dtype, N=N, D=D, C=C: (N * D + 2 * N * C) * torch.finfo(dtype).bits // 8,
            modes=("fwd",), config={"N": N, "D": D, "C": C, "precision": with_p}, rtol=1e-3, atol=1e-2,
            warmup=1 if with_p else 3))
    return cases


def all_cases():
    return stats_cases() + gmm_cases() + anchor_cases()


# repeats for the slow cases (each call of a provider there takes seconds)
SLOW = {"sample_stats N=1280000,C=1000": 5, "classwise_gmm N=1280000,C=1000,iters=20": 3,
        "anchor_distances N=60000,D=2048,C=10,precision": 5}

TARGETS = [  # (benchmark, against, target ratio ddfast / against)
    ("sample_stats", "eager", 3.0),
    ("classwise_gmm", "eager", 3.0),
    ("classwise_gmm", "sklearn", 20.0),
]


def summary(rows):
    """Ratio of each speed target, per case."""
    med = {(r["benchmark"], r["case"], r["dtype"], r["provider"]): r["median_ms"] for r in rows}
    lines = []
    for bench, against, target in TARGETS:
        for (b, case, dtype, prov), ms in med.items():
            if b != bench or prov != "ddfast" or (b, case, dtype, against) not in med:
                continue
            ratio = med[(b, case, dtype, against)] / ms
            ok = "met" if ratio >= target else "MISSED"
            lines.append(f"{bench:<18} {case:<36} {dtype:<8} ddfast vs {against:<8} {ratio:8.1f}x  "
                         f"(target >= {target:g}x: {ok})")
    print("\nTargets")
    print("\n".join(lines) if lines else "(no target rows)")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--providers", default=None, help="comma-separated subset of ddfast,eager,compile,sklearn")
    ap.add_argument("--filter", default=None, help="substring of 'benchmark case' to run")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--no-csv", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--clock", choices=("wall", "process"), default="wall",
                    help="'process': CPU time of this process instead of wall time -- with --threads 1 it does not "
                         "count the time other processes take the cores (a shared, loaded machine)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "process":
        import types

        import harness

        harness.time = types.SimpleNamespace(perf_counter=time.process_time)  # what harness.time_fn reads
    device = torch.device(args.device)
    providers = args.providers.split(",") if args.providers else None
    rows = []
    for case in all_cases():
        key = f"{case.benchmark} {case.name}"
        if args.filter and args.filter not in key:
            continue
        if args.clock != "wall":
            case.config["clock"] = args.clock
        r = run_case(case, device, providers=providers, repeats=min(args.repeats, SLOW.get(key, args.repeats)))
        print_table(r)
        rows += r
        _cache.clear()
    summary(rows)
    if not args.no_csv and rows:
        append_rows(rows)
        print(f"appended {len(rows)} rows to {RESULTS_CSV}")
    return rows


if __name__ == "__main__":
    main()
