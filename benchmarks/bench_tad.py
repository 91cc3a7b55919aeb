"""TAD partition quality and overhead on Fashion-MNIST (and, optionally, base vs +TAD distillation).

For every noise spec (default: 40% symmetric and 40% asymmetric, ddfast.noise, seed 0) on the 60,000
Fashion-MNIST training images, runs TAD's rounds of partition and recall alone (``ddfast.tad.tad_partition``,
no distillation) and prints, per round: the trusted-set size (GMM, kept, recalled), its precision and recall as a
detector of correctly labelled samples, the pseudo-label accuracy (and that of the labels they replace), and
cleanlab's ``find_label_issues`` on the same predictions side by side (plus, with ``--oos-folds K``, on K-fold
out-of-sample predictions); then TAD's own wall time split by stage (scorer training, scoring, GMM, recall;
cleanlab reported apart: it is a diagnostic, not part of TAD).

``--distill METHOD`` additionally runs the full pipeline (``ddfast.pipeline.run``, preset quick, IPC 10, no
baselines) with and without TAD on the first spec and reports the test accuracy of both distilled sets.

Usage::

    .venv/bin/python benchmarks/bench_tad.py                          # sym:0.4 and asym:0.4, default TAD
    .venv/bin/python benchmarks/bench_tad.py --variant margin:trust_statistic=margin --specs asym:0.4
    .venv/bin/python benchmarks/bench_tad.py --distill datm --specs sym:0.4 --json out.json
    .venv/bin/python benchmarks/bench_tad.py --specs sym:0.8 --variant e12:scorer.warmup_epochs=12

Prints markdown (paste into benchmarks/RESULTS.md) and, with ``--json``, writes everything measured.
Run it when the machine is quiet; the wall times depend on the load (printed with ``uptime`` before and after).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except Exception:  # pragma: no cover
        return "?"


def _pct(v) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def _parse_value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


def parse_variant(text: str):
    """``NAME`` or ``NAME:key=value,key=value`` -> (name, overrides)."""
    name, _, rest = text.partition(":")
    over = {}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        over[k.strip()] = _parse_value(v.strip())
    return name, over


def round_table(rounds: List[Dict[str, Any]]) -> str:
    head = ("| round | T (GMM) | kept | recalled (relabelled) | T | precision | recall | GMM prec. / rec. | "
            "pseudo-label acc. (labels replaced) | cleanlab prec. / rec. (n clean) | f acc. / fits noise | "
            "posterior labels acc. | s |")
    lines = [head, "|" + "---|" * 13]
    for d in rounds:
        cl = (f"{_pct(d.get('cleanlab_precision'))} / {_pct(d.get('cleanlab_recall'))} "
              f"({d.get('cleanlab_n_clean', '—')})")
        lines.append(
            f"| {d['round']} | {d['n_trusted_gmm']} | {d['n_kept']} | {d['n_recalled']} ({d['n_relabelled']}) | "
            f"{d['n_trusted']} | {_pct(d.get('precision'))} | {_pct(d.get('recall'))} | "
            f"{_pct(d.get('gmm_precision'))} / {_pct(d.get('gmm_recall'))} | "
            f"{_pct(d.get('pseudo_label_accuracy'))} ({_pct(d.get('replaced_label_accuracy'))}) | {cl} | "
            f"{_pct(d.get('scorer_accuracy'))} / {_pct(d.get('scorer_noisy_fit'))} | "
            f"{_pct(d.get('posterior_label_accuracy'))} | {d['seconds']['total']:.1f} |")
    return "\n".join(lines)


def run_partition(spec: str, overrides: Dict[str, Any], oos_folds: int, n: int) -> Dict[str, Any]:
    from ddfast.data import load_dataset
    from ddfast.distill.base import TrainSet
    from ddfast.noise import corrupt_labels
    from ddfast.tad import TADConfig, tad_partition

    ds = load_dataset("fashion-mnist")
    if n and n < len(ds):
        ds = ds.subset(torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n])
    nl = corrupt_labels(ds.labels, spec, ds.num_classes, seed=0, mapping="fashion-mnist")
    train = TrainSet(ds.images, nl.labels, ds.num_classes, ds.mean, ds.std, ds.name)
    cfg = TADConfig().replace(**{**overrides, **({"cleanlab_folds": oos_folds} if oos_folds else {})})
    t0 = time.perf_counter()
    res = tad_partition(train, cfg, clean_labels=nl, quiet=False)
    wall = time.perf_counter() - t0
    stages = {k: sum(d["seconds"][k] for d in res.rounds)
              for k in ("scorer", "score", "gmm", "recall", "cleanlab", "cpu")}
    return {"spec": spec, "n": len(ds), "clean_rate": float(nl.clean_mask.double().mean()), "config": cfg.to_dict(),
            "rounds": res.rounds, "summary": res.summary, "stages": stages, "wall_seconds": wall}


def run_distill(method: str, spec: str, seed: int, tad_over: Dict[str, Any], out_root: str) -> Dict[str, Any]:
    from ddfast.pipeline import RunConfig, run

    out = {}
    for use_tad in (False, True):
        cfg = RunConfig(dataset="fashion-mnist", noise=spec, method=method, tad=use_tad, ipc=10, preset="quick",
                        seed=seed, out=os.path.join(out_root, f"{method}{'-tad' if use_tad else ''}-{spec.replace(':', '')}"),
                        baselines=(), device="cpu", quiet=True,
                        overrides={"tad": dict(tad_over)} if use_tad and tad_over else {})
        t0 = time.perf_counter()
        m = run(cfg)
        out["tad" if use_tad else "base"] = {"metrics": m.get("results", {}).get("distilled", m.get("results")),
                                             "seconds": time.perf_counter() - t0,
                                             "tad": (m.get("tad") or m.get("distill", {}).get("tad")) if use_tad else None}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specs", nargs="+", default=["sym:0.4", "asym:0.4"])
    ap.add_argument("--variant", action="append", default=None,
                    help="NAME or NAME:key=value,... (TADConfig overrides); repeatable. Default: 'default'.")
    ap.add_argument("--oos-folds", type=int, default=0, help="also cleanlab on K-fold out-of-sample predictions")
    ap.add_argument("--n", type=int, default=0, help="use a seeded slice of n training images (0 = all 60,000)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--distill", default=None, help="also run base vs +TAD distillation with this method")
    ap.add_argument("--distill-out", default="/tmp/ddfast_bench_tad_runs")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = [parse_variant(v) for v in (args.variant or ["default"])]
    report: Dict[str, Any] = {"uptime_before": _uptime(), "threads": args.threads, "torch": torch.__version__,
                              "results": []}
    print(f"uptime before: {report['uptime_before']}; torch threads {args.threads}")
    for spec in args.specs:
        for name, over in variants:
            r = run_partition(spec, over, args.oos_folds, args.n)
            r["variant"] = name
            report["results"].append(r)
            s = r["stages"]
            print(f"\n### Fashion-MNIST {spec} ({r['n']} images, clean rate {100 * r['clean_rate']:.1f}%), "
                  f"variant {name} {over or ''}\n")
            print(round_table(r["rounds"]))
            r0 = r["rounds"][0]
            if r0.get("cleanlab_oos_precision") is not None:
                print(f"\ncleanlab on {r0['cleanlab_oos_folds']}-fold out-of-sample predictions (round 0 labels): "
                      f"precision {_pct(r0['cleanlab_oos_precision'])}, recall {_pct(r0['cleanlab_oos_recall'])}, "
                      f"{r0['cleanlab_oos_n_clean']} kept")
            print(f"\nTAD overhead {sum(s[k] for k in ('scorer', 'score', 'gmm', 'recall')):.1f} s (scorer training "
                  f"{s['scorer']:.1f}, scoring {s['score']:.1f}, GMM {s['gmm']:.2f}, recall {s['recall']:.1f}); "
                  f"cleanlab diagnostics {s['cleanlab']:.1f} s; wall {r['wall_seconds']:.1f} s; "
                  f"TAD CPU time {s['cpu']:.1f} s (process, {args.threads} thread(s))")
    if args.distill:
        over = variants[0][1]
        d = run_distill(args.distill, args.specs[0], 0, over, args.distill_out)
        report["distill"] = {"method": args.distill, "spec": args.specs[0], **d}
        print(f"\n### {args.distill.upper()} quick, IPC 10, Fashion-MNIST {args.specs[0]}: base vs +TAD\n")
        for k in ("base", "tad"):
            m = d[k]["metrics"] or {}
            print(f"- {args.distill.upper()}{' + TAD' if k == 'tad' else ''}: {m.get('mean', float('nan')):.2f} "
                  f"+- {m.get('std', float('nan')):.2f} % ({len(m.get('accs', []))} runs), "
                  f"{d[k]['seconds']:.0f} s end to end")
    report["uptime_after"] = _uptime()
    print(f"\nuptime after: {report['uptime_after']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
