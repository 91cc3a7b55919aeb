"""``ddfast sweep CONFIG.yaml``: a grid of ``ddfast run`` cells and one results table.

The YAML file (see ``examples/sweep_fmnist.yaml``)::

    dataset: fashion-mnist          # one dataset per sweep
    methods: [datm, dance, rcig]
    noise: [sym:0.4, asym:0.4]
    ipc: [10]
    tad: [false, true]
    seeds: [0]
    imbalance: [null]               # optional: long-tailed training sets, n_min / n_max (null = all images);
                                    # such cells go to OUT/<method>[-tad]/<noise>-lt<R>/ipc<K>/seed<S>
    preset: quick
    out: runs/sweep_fmnist          # cells go to OUT/<method>[-tad]/<noise>/ipc<K>/seed<S>
    device: auto                    # optional
    eval_runs: null                 # optional: evaluation runs (default: each method's protocol)
    baselines: [full_noisy, random_subset, gce, coteaching]
    privacy: true                   # optional: the privacy audit in every cell's report (default true)
    overrides:                      # optional, for every cell (sections as in `ddfast run --override`)
      baseline: {epochs: 30}
    method_overrides:               # optional, per method
      datm: {distill: {iterations: 200}}
    extra:                          # optional: more cells, each a partial grid; missing axes from above
      - {ipc: [50], noise: [sym:0.4, sym:0.8], tad: [false]}

Each cell is run exactly as ``ddfast run`` would run it (:func:`ddfast.pipeline.run`), in its own directory:
a finished cell (``report.md`` written) is skipped, an interrupted one resumes. The expert/pool and baseline
caches are shared by the cells (with and without TAD on the same noise reuse the same full-data baselines).
At the end ``OUT/results.md`` and ``OUT/results.csv`` hold the table in the papers' shape (rows: method +/-
TAD and the baselines; columns: noise spec @ IPC) and ``OUT/sweep.json`` every cell's state and numbers.
``OUT/noise_study.png`` plots test accuracy against the noise rate (one panel per noise kind and IPC, one line
per method, the baselines dashed), and ``results.md`` ends with the crossover rate per method: the lowest noise
rate at which the distilled set beats the last-epoch full-noisy baseline (:func:`ddfast.report.crossover_rates`),
the cells that did not finish, and the time the cells took.
"""
from __future__ import annotations

import itertools
import os
import re
import time
import traceback
from typing import Any, Dict, List, Optional, Sequence

from .io import atomic_write_json, load_json

__all__ = ["load_sweep", "expand_cells", "run_sweep", "SWEEP_KEYS"]

SWEEP_KEYS = ("dataset", "methods", "noise", "ipc", "tad", "seeds", "imbalance", "preset", "out", "device",
              "eval_runs", "baselines", "overrides", "method_overrides", "cache_dir", "data_root", "quiet",
              "noise_seed", "privacy", "extra")
GRID_AXES = ("methods", "noise", "ipc", "tad", "seeds", "imbalance")


def _as_list(v) -> List[Any]:
    if v is None:
        return []
    return list(v) if isinstance(v, (list, tuple)) else [v]


def load_sweep(path: str) -> Dict[str, Any]:
    """Reads and checks a sweep YAML file; relative ``out`` paths are taken from the current directory.

    Raises:
        pipeline.UsageError: missing file, invalid YAML, unknown keys, empty axes.
    """
    import yaml

    from .pipeline import UsageError

    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such sweep file")
    try:
        with open(path, encoding="utf-8") as f:
            spec = yaml.safe_load(f) or {}
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: invalid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(spec, dict):
        raise UsageError(f"{path}: expected a mapping at the top level")
    unknown = sorted(set(spec) - set(SWEEP_KEYS))
    if unknown:
        raise UsageError(f"{path}: unknown key(s) {unknown}; known: {list(SWEEP_KEYS)}")
    spec.setdefault("dataset", "fashion-mnist")
    spec.setdefault("methods", ["datm"])
    spec.setdefault("noise", ["sym:0.4"])
    spec.setdefault("ipc", [10])
    spec.setdefault("tad", [False, True])
    spec.setdefault("seeds", [0])
    if spec.get("imbalance") is None:
        spec["imbalance"] = [None]  # balanced (all images)
    spec.setdefault("preset", "quick")
    spec.setdefault("out", os.path.join("runs", "sweep"))
    if not isinstance(spec.get("privacy", True), bool):
        raise UsageError(f"{path}: 'privacy' must be true or false, got {spec['privacy']!r}")
    for k in GRID_AXES:
        spec[k] = _as_list(spec[k])
        if not spec[k]:
            raise UsageError(f"{path}: '{k}' is empty")
    ov = spec.get("overrides")
    if ov is not None and not (isinstance(ov, dict) and all(isinstance(v, dict) for v in ov.values())):
        raise UsageError(f"{path}: 'overrides' must map sections to settings, e.g. {{baseline: {{epochs: 30}}}}")
    mo = spec.get("method_overrides")
    if mo is not None and not (isinstance(mo, dict) and all(
            isinstance(v, dict) and all(isinstance(x, dict) for x in v.values()) for v in mo.values())):
        raise UsageError(f"{path}: 'method_overrides' must map methods to sections to settings, e.g. "
                         "{datm: {distill: {iterations: 400}}}")
    extra = spec.get("extra") or []
    if not isinstance(extra, list) or not all(isinstance(e, dict) for e in extra):
        raise UsageError(f"{path}: 'extra' must be a list of mappings of grid axes {list(GRID_AXES)}")
    for e in extra:
        bad = sorted(set(e) - set(GRID_AXES))
        if bad:
            raise UsageError(f"{path}: 'extra' entry has unknown key(s) {bad}; known: {list(GRID_AXES)}")
        for k in e:
            e[k] = _as_list(e[k])
            if not e[k]:
                raise UsageError(f"{path}: 'extra' entry has an empty '{k}'")
    spec["extra"] = extra
    for grid in [spec] + extra:
        for k in ("ipc", "seeds"):
            for v in grid.get(k, []):
                if isinstance(v, bool) or not isinstance(v, int):
                    raise UsageError(f"{path}: '{k}' entries must be integers, got {v!r}")
        for v in grid.get("imbalance", []):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1):
                raise UsageError(f"{path}: 'imbalance' entries must be ratios n_min / n_max in (0, 1] or null, "
                                 f"got {v!r}")
    spec["_path"] = os.path.abspath(path)
    return spec


def _path_part(text: str) -> str:
    """``text`` as one folder name: characters other than letters, digits, ``.``, ``_``, ``-`` become ``_`` (no
    separators, so a cell folder stays inside ``out`` whatever the spec says), no leading dots."""
    part = re.sub(r"[^A-Za-z0-9._-]+", "_", text).lstrip(".")
    return part or "_"


def _cell_name(method: str, tad: bool, noise: str, ipc: int, seed: int, imbalance: Optional[float] = None) -> str:
    lt = "" if imbalance is None else f"-lt{float(imbalance):g}"
    return (f"{_path_part(method)}{'-tad' if tad else ''}/{_path_part(noise.replace(':', '') + lt)}/ipc{ipc}/"
            f"seed{seed}")


def expand_cells(spec: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The grid as a list of cells: ``{"name", "out", "config": RunConfig}`` in the order methods x TAD x
    noise x IPC x seeds (a method's cells together: they share its expert/pool caches)."""
    from .pipeline import DEFAULT_BASELINES, RunConfig, UsageError

    cells = []
    base_ov = spec.get("overrides") or {}
    per_method = spec.get("method_overrides") or {}
    baselines = spec.get("baselines")
    baselines = DEFAULT_BASELINES if baselines is None else tuple(_as_list(baselines))
    if baselines == ("none",):
        baselines = ()
    grids = [spec] + [{**{k: spec[k] for k in GRID_AXES}, **e} for e in (spec.get("extra") or [])]
    combos = []
    for grid in grids:
        for combo in itertools.product(grid["methods"], grid["tad"], grid["noise"], grid["ipc"], grid["seeds"],
                                       grid["imbalance"]):
            if combo not in combos:
                combos.append(combo)
    # a method's cells together (they share its expert / pool caches); otherwise the grid order
    order = {m: i for i, m in enumerate(dict.fromkeys([c[0] for c in combos]))}
    combos.sort(key=lambda c: order[c[0]])
    for method, tad, noise, ipc, seed, imbalance in combos:
        if not isinstance(tad, bool):
            raise UsageError(f"sweep: 'tad' entries must be true/false, got {tad!r}")
        ov: Dict[str, Dict[str, Any]] = {k: dict(v) for k, v in base_ov.items()}
        for sec, kv in (per_method.get(str(method)) or {}).items():
            ov.setdefault(sec, {}).update(kv)
        if not tad:
            ov.pop("tad", None)  # TAD options only apply to the cells with TAD
        name = _cell_name(str(method), tad, str(noise), int(ipc), int(seed), imbalance)
        out = os.path.join(spec["out"], name)
        cfg = RunConfig(dataset=str(spec["dataset"]), noise=str(noise), method=str(method).lower(), tad=tad,
                        ipc=int(ipc), preset=str(spec["preset"]), seed=int(seed),
                        imbalance=None if imbalance is None else float(imbalance),
                        noise_seed=spec.get("noise_seed"), out=out,
                        device=str(spec.get("device") or "auto"), eval_runs=spec.get("eval_runs"),
                        baselines=tuple(baselines), data_root=spec.get("data_root"),
                        cache_dir=spec.get("cache_dir"), overrides=ov, privacy=bool(spec.get("privacy", True)),
                        quiet=bool(spec.get("quiet", False)))
        cells.append({"name": name, "out": out, "config": cfg, "method": str(method).lower(), "tad": tad,
                      "noise": str(noise), "ipc": int(ipc), "seed": int(seed),
                      "imbalance": None if imbalance is None else float(imbalance)})
    return cells


def _state(out: str) -> str:
    if os.path.exists(os.path.join(out, "report.md")) and os.path.exists(os.path.join(out, "metrics.json")):
        return "done"
    if os.path.exists(os.path.join(out, "run.json")):
        return "partial"
    return "todo"


def run_sweep(spec: Dict[str, Any], only: Optional[str] = None, dry_run: bool = False,
              keep_going: bool = False) -> Dict[str, Any]:
    """Runs the cells of ``spec`` (from :func:`load_sweep`) that are not finished, then writes the table.

    Returns ``{"cells": [...], "n_cells", "n_done", "n_failed", "table_markdown", "table_md", "table_csv"}``.
    Raises the first cell's error unless ``keep_going`` (then the cell is recorded as failed).
    """
    from . import distributed as dd
    from .pipeline import run
    from .report import crossover_rates, plot_noise_study, run_wall_seconds, sweep_table

    cells = expand_cells(spec)
    if only:
        cells = [c for c in cells if only in c["name"]]
    out_root = spec["out"]
    summary_cells = []
    failed = 0
    for i, c in enumerate(cells):
        state = _state(c["out"])
        entry = {k: c[k] for k in ("name", "out", "method", "tad", "noise", "ipc", "seed", "imbalance")}
        entry["state"] = state
        if dry_run:
            summary_cells.append(entry)
            continue
        if state == "done":
            if not spec.get("quiet") and dd.is_main():
                print(f"[{i + 1}/{len(cells)}] {c['name']}: done earlier, skipped", flush=True)
        else:
            if not spec.get("quiet") and dd.is_main():
                print(f"[{i + 1}/{len(cells)}] {c['name']}: {'resuming' if state == 'partial' else 'running'}",
                      flush=True)
            t0 = time.perf_counter()
            try:
                run(c["config"])
                entry["state"] = "done"
                entry["seconds_this_session"] = time.perf_counter() - t0
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001
                if not keep_going:
                    raise
                failed += 1
                entry["state"] = "failed"
                entry["error"] = f"{type(exc).__name__}: {exc}"
                entry["traceback"] = traceback.format_exc(limit=5)
        summary_cells.append(entry)
    if dry_run:
        return {"cells": summary_cells, "n_cells": len(cells), "n_done": sum(c["state"] == "done" for c in summary_cells),
                "n_failed": 0}
    table_cells = []
    for e in summary_cells:
        mp = os.path.join(e["out"], "metrics.json")
        if e["state"] == "done" and os.path.exists(mp):
            m = load_json(mp)
            table_cells.append({**e, "metrics": m})
            e["results"] = {k: {"mean": v.get("mean"), "std": v.get("std")} for k, v in m.get("results", {}).items()}
            e["total_seconds"] = run_wall_seconds(m)  # over all invocations when the cell was resumed
    md_path = os.path.join(out_root, "results.md")
    csv_path = os.path.join(out_root, "results.csv")
    md = ""
    if dd.is_main():
        md, _ = sweep_table(table_cells, md_path=None, csv_path=csv_path)
        header = (f"Sweep `{os.path.basename(spec.get('_path', 'sweep'))}` on {spec['dataset']}, preset "
                  f"{spec['preset']}: test accuracy (%) of a ConvNet trained on each set, mean ± std over the "
                  "evaluation runs (over seeds when several). Baselines do not depend on the method; the random "
                  "subset uses each method's evaluation protocol.\n\n")
        from .io import atomic_write_text

        cross = crossover_rates(table_cells)
        plot = plot_noise_study(table_cells, os.path.join(out_root, "noise_study.png"))
        tail = _study_text(cross, summary_cells, plot, out_root, table_cells)
        atomic_write_text(header + md + tail, md_path)
        atomic_write_json({"spec": {k: v for k, v in spec.items() if not k.startswith("_")},
                           "cells": summary_cells, "crossover": cross}, os.path.join(out_root, "sweep.json"))
    return {"cells": summary_cells, "n_cells": len(cells),
            "n_done": sum(c["state"] == "done" for c in summary_cells), "n_failed": failed,
            "table_markdown": md, "table_md": md_path, "table_csv": csv_path}


def _study_text(cross: List[Dict[str, Any]], cells: List[Dict[str, Any]], plot: Optional[str], out_root: str,
                done_cells: Sequence[Dict[str, Any]] = ()) -> str:
    """The end of ``results.md``: the plot, the crossover rate per method, the head / middle / tail table of
    long-tailed cells, unfinished cells, the time taken."""
    from .report import crossover_table, long_tail_rows, long_tail_text

    lines = [""]
    if plot:
        lines += [f"![test accuracy against noise rate]({os.path.relpath(plot, out_root)})", ""]
    if cross:
        lines += ["Crossover: the lowest noise rate at which the distilled set beats the full noisy training set "
                  "trained to its last epoch (\"none\": at no measured rate).", "", crossover_table(cross), ""]
    lt = long_tail_text(long_tail_rows(done_cells))
    if lt:
        lines += [lt]
    missing = [c for c in cells if c.get("state") != "done"]
    if missing:
        lines += ["Cells not finished: " + ", ".join(f"`{c['name']}` ({c['state']})" for c in missing) + ".", ""]
    secs = [c.get("total_seconds") for c in cells if isinstance(c.get("total_seconds"), (int, float))]
    if secs:
        lines += [f"{len(secs)} finished cells, {sum(secs) / 3600:.2f} h of wall time in total (each cell's "
                  "metrics.json has its own).", ""]
    return "\n".join(lines)
