"""The noise-rate study's table, crossover rates and plot for every method measured, from one CSV.

``ddfast sweep`` draws the plot of the cells in its own ``out`` folder. The study's cells were run as several
sweeps on different days (one folder per method, folders lost between machine resets), so their measured
results are kept in ``benchmarks/noise_study_fmnist.csv``, one row per cell: the distilled set's mean ± std over
its evaluation runs, the full noisy set's last-epoch / early-stopped / best-epoch accuracy, the random real
subset, the cell's wall time and the commit it ran on. This script

- appends (or replaces) the rows of finished run directories (``--add RUN_DIR ...``: each ``metrics.json`` of
  ``ddfast run`` / ``ddfast sweep``; commit given with ``--commit``); a cell run without the full noisy baseline
  takes it from another method's cell on the same noisy labels (:func:`borrow_full_noisy`; the column
  ``full_noisy_from`` names that cell),
- prints the markdown table and the crossover rate per (method, noise kind, IPC): the lowest noise rate at which
  the distilled set beats the last-epoch full noisy set (:func:`ddfast.report.crossover_rates`),
- draws the plot of all methods with :func:`ddfast.report.plot_noise_study` (the sweep's own plot).

Usage::

    python benchmarks/plot_noise_study.py [--csv benchmarks/noise_study_fmnist.csv]
        [--add runs/.../metrics.json-folder ... --commit SHA] [--out benchmarks/noise_study_fmnist.png]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from typing import Any, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

FIELDS = ["method", "noise", "ipc", "seed", "realised_rate", "distilled_mean", "distilled_std", "full_noisy_last",
          "full_noisy_early_stop", "full_noisy_best_epoch", "random_subset_mean", "random_subset_std",
          "cell_seconds", "commit", "full_noisy_from"]
BASELINE_COLS = ["full_noisy_last", "full_noisy_early_stop", "full_noisy_best_epoch"]


def _f(x: Any) -> str:
    return "" if x is None else f"{float(x):.2f}"


def row_from_run(run_dir: str, commit: str) -> Dict[str, str]:
    """One CSV row from a finished run directory (its ``metrics.json``). Raises ValueError when the run is not
    complete or has no distilled result."""
    from ddfast.report import run_wall_seconds

    path = os.path.join(run_dir, "metrics.json")
    with open(path) as f:
        m = json.load(f)
    res = m.get("results", {})
    if not m.get("complete") or "distilled" not in res:
        raise ValueError(f"{path}: not a finished run (complete={m.get('complete')}, rows={sorted(res)})")
    cfg = m["config"]
    if cfg.get("tad"):
        raise ValueError(f"{path}: a TAD run; the noise-rate study holds the base methods")
    fn = res.get("full_noisy") or {}
    ev = fn.get("eval") or {}
    rs = res.get("random_subset") or {}
    return {"method": cfg["method"], "noise": cfg["noise"], "ipc": str(cfg["ipc"]), "seed": str(cfg["seed"]),
            "realised_rate": f"{float(m['noise'].get('realised_rate', 0.0)):.3f}",
            "distilled_mean": _f(res["distilled"]["mean"]), "distilled_std": _f(res["distilled"].get("std")),
            "full_noisy_last": _f(fn.get("mean")),
            "full_noisy_early_stop": _f((ev.get("early_stop") or {}).get("mean")),
            "full_noisy_best_epoch": _f((ev.get("best_epoch") or {}).get("mean")),
            "random_subset_mean": _f(rs.get("mean")), "random_subset_std": _f(rs.get("std")),
            "cell_seconds": f"{run_wall_seconds(m) or 0.0:.0f}", "commit": commit, "full_noisy_from": ""}


def borrow_full_noisy(row: Dict[str, str], rows: List[Dict[str, str]]) -> Dict[str, str]:
    """Fills a cell run without the full noisy baseline (``baselines: [random_subset]``) from the first row of
    another method with the same noise and seed. The baseline depends only on the noisy labels (dataset, noise
    spec, seed), not on the distiller, so the cells share one trained network; ``ddfast sweep`` does the same
    through its baseline cache. ``full_noisy_from`` names the cell the numbers come from. Rows that have the
    baseline, or have no donor, are returned unchanged."""
    if row["full_noisy_last"]:
        return row
    for r in rows:
        if (r["noise"], r["seed"]) == (row["noise"], row["seed"]) and r["full_noisy_last"] and \
                not r.get("full_noisy_from"):
            return {**row, **{k: r[k] for k in BASELINE_COLS},
                    "full_noisy_from": f"{r['method']}/{r['noise']}/ipc{r['ipc']}/seed{r['seed']}"}
    return row


def cells_from_rows(rows: List[Dict[str, str]]) -> List[Dict[str, Any]]:
    """The rows as the finished-cell dicts :mod:`ddfast.report`'s study functions read."""
    cells = []
    for r in rows:
        res: Dict[str, Any] = {"distilled": {"mean": float(r["distilled_mean"]), "std": float(r["distilled_std"])}}
        if r["full_noisy_last"]:
            ev = {k: {"mean": float(r[f"full_noisy_{k}"]), "std": 0.0}
                  for k in ("early_stop", "best_epoch") if r[f"full_noisy_{k}"]}
            res["full_noisy"] = {"mean": float(r["full_noisy_last"]), "std": 0.0, "eval": ev}
        cells.append({"method": r["method"], "tad": False, "noise": r["noise"], "ipc": int(r["ipc"]),
                      "seed": int(r["seed"]), "imbalance": None, "metrics": {"results": res}})
    return cells


def markdown(rows: List[Dict[str, str]], cross: List[Dict[str, Any]]) -> str:
    order = {"none": 0, "sym": 1, "asym": 2, "idn": 3}
    rows = sorted(rows, key=lambda r: (r["method"], int(r["ipc"]), order.get(r["noise"].split(":")[0], 9),
                                       r["noise"]))
    out = ["| method | noise | IPC | realised rate | distilled | full noisy: last / early-stopped / best epoch "
           "| random real | distilled - full noisy (last) | cell wall time | commit |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        diff = (f"{float(r['distilled_mean']) - float(r['full_noisy_last']):+.2f}" if r["full_noisy_last"] else "")
        mark = "†" if r.get("full_noisy_from") else ""
        rnd = f"{r['random_subset_mean']} ± {r['random_subset_std']}" if r["random_subset_mean"] else ""
        out.append(f"| {r['method'].upper()} | {r['noise']} | {r['ipc']} | {100 * float(r['realised_rate']):.1f} % | "
                   f"**{r['distilled_mean']} ± {r['distilled_std']}** | {r['full_noisy_last']} / "
                   f"{r['full_noisy_early_stop']} / {r['full_noisy_best_epoch']}{mark} | {rnd} | {diff} | "
                   f"{r['cell_seconds']} s | {r['commit']} |")
    from ddfast.report import crossover_table

    foot = (["", "† the full noisy baseline of the same noisy labels, trained once in another method's cell "
             "(named in the CSV's `full_noisy_from`)."] if any(r.get("full_noisy_from") for r in rows) else [])
    return "\n".join(out + foot + ["", crossover_table(cross)])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--csv", default=os.path.join(HERE, "noise_study_fmnist.csv"))
    p.add_argument("--add", nargs="*", default=[], help="finished run directories to append / replace")
    p.add_argument("--commit", default="", help="the commit the added runs ran on")
    p.add_argument("--out", default=os.path.join(HERE, "noise_study_fmnist.png"))
    a = p.parse_args(argv)
    with open(a.csv, newline="") as f:
        rows = [{**r, "full_noisy_from": r.get("full_noisy_from") or ""} for r in csv.DictReader(f)]
    if a.add:
        if not a.commit:
            p.error("--add needs --commit (the commit the runs ran on)")
        key = lambda r: (r["method"], r["noise"], r["ipc"], r["seed"])  # noqa: E731
        new = [borrow_full_noisy(row_from_run(d, a.commit), rows) for d in a.add]
        keys = {key(r) for r in new}
        rows = [r for r in rows if key(r) not in keys] + new
        tmp = a.csv + ".tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, a.csv)
    from ddfast.report import crossover_rates, plot_noise_study

    cells = cells_from_rows(rows)
    cross = crossover_rates(cells)
    print(markdown(rows, cross))
    path = plot_noise_study(cells, a.out)
    print(f"\nplot: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
