"""What a run leaves behind for people: the image grid, the plots, ``report.md`` and the sweep tables.

Everything here is written atomically (:mod:`ddfast.io`): a PNG or markdown file under its final name is
always complete.

- :func:`synset_pixels` -- the synthetic images as pictures: the network-input transform
  (:meth:`ddfast.distill.base.SyntheticSet.input_transform`: normalisation, ZCA) inverted (the ZCA trap of
  mtt-distillation#11).
- :func:`save_synset_grid` -- a ``torchvision.utils.make_grid`` PNG: one row per class, normalisation and
  ZCA undone.
- :func:`plot_curves`, :func:`plot_tad_rounds` -- matplotlib PNGs (distillation loss, accuracy over
  iterations, trusted-set growth per TAD round).
- :func:`render_report` -- ``report.md`` from a ``metrics.json`` dict.
- :func:`sweep_table` -- the papers' table shape (rows: method +/- TAD and the baselines; columns: noise
  specs) as markdown and CSV.
"""
from __future__ import annotations

import csv
import io as _io
import math
import os
import shlex
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from .io import atomic_open, atomic_write_text

__all__ = [
    "synset_pixels",
    "save_synset_grid",
    "synset_grid_rows",
    "plot_curves",
    "plot_tad_rounds",
    "plot_baseline_curves",
    "plot_noise_study",
    "crossover_rates",
    "crossover_table",
    "result_row",
    "RESULT_ROWS",
    "render_report",
    "sweep_table",
    "BASELINE_TITLES",
    "baseline_title",
    "fmt_acc",
    "run_wall_seconds",
]

#: row titles of the results (metrics.json ``results`` keys)
BASELINE_TITLES = {
    "distilled": "distilled set",
    "random_subset": "random real subset (noisy labels)",
    "random_subset_decoded": "random real subset, decoded like the distilled set (noisy labels)",
    "full_noisy": "full noisy training set, last epoch",
    "full_noisy@early_stop": "full noisy training set, early stopped on held-out noisy labels",
    "full_noisy@best_epoch": "full noisy training set, best epoch (oracle)",
    "gce": "GCE loss on the full noisy set, last epoch",
    "coteaching": "Co-teaching on the full noisy set, last epoch",
    "full_clean": "full clean training set (oracle)",
}

#: the same rows when the run adds no label noise (``--noise none``)
_CLEAN_TITLES = {"random_subset": "random real subset", "full_noisy": "full training set, last epoch",
                 "random_subset_decoded": "random real subset, decoded like the distilled set",
                 "full_noisy@early_stop": "full training set, early stopped on held-out labels",
                 "full_noisy@best_epoch": "full training set, best epoch (oracle)",
                 "gce": "GCE loss on the full training set, last epoch",
                 "coteaching": "Co-teaching on the full training set, last epoch"}

#: the results rows in report order; ``name@variant`` rows come from a full-data result's ``eval[variant]``
RESULT_ROWS = ("distilled", "random_subset", "random_subset_decoded", "full_noisy", "full_noisy@early_stop",
               "full_noisy@best_epoch", "gce", "coteaching", "full_clean")


def result_row(results: Dict[str, Any], key: str) -> Optional[Dict[str, Any]]:
    """The result of a row of :data:`RESULT_ROWS`: ``results[key]``, or for ``name@variant`` the variant of a
    full-data baseline (early stopping, best epoch) recorded in its ``eval`` facts; None when absent."""
    if "@" not in key:
        return results.get(key)
    name, variant = key.split("@", 1)
    base = results.get(name) or {}
    v = (base.get("eval") or {}).get(variant)
    if not isinstance(v, dict) or v.get("mean") is None:
        return None
    return {"mean": v["mean"], "std": v.get("std", 0.0), "accs": v.get("accs", []), "epochs": v.get("epochs"),
            "n_images": base.get("n_images"), "n_stored": base.get("n_stored"), "description": v.get("note", "")}


def _sizes(r: Dict[str, Any]) -> str:
    """``"100 images"`` or, when training decodes stored images, ``"100 stored images (400 decoded)"``."""
    n, s = r.get("n_images", "?"), r.get("n_stored")
    return f"{n} images" if s is None or s == n else f"{s} stored images, {n} decoded for training"


def baseline_title(key: str, noise_spec: Optional[str] = None) -> str:
    """Row title of a ``results`` key; without label noise (``noise_spec == "none"``) the titles drop "noisy"."""
    if noise_spec == "none" and key in _CLEAN_TITLES:
        return _CLEAN_TITLES[key]
    return BASELINE_TITLES.get(key, key)


# ----------------------------------------------------------------------------------------------------------
# the synthetic set as pictures
# ----------------------------------------------------------------------------------------------------------
def synset_pixels(syn) -> torch.Tensor:
    """``float32 [M, C, H, W]`` in ``[0, 1]``: the synthetic images with the input transform undone
    (clamped; distilled pixels may leave the data range)."""
    t = syn.input_transform()
    with torch.no_grad():
        x = t.inverse(syn.images.detach().float().cpu())
    return x.clamp(0.0, 1.0)


def synset_grid_rows(syn) -> torch.Tensor:
    """``int64 [M]``: the grid row (class) of each synthetic image. Hard labels are their own row. Soft labels
    use the class the image was distilled for: every ddfast distiller stores its images class-major, ``M / C``
    per class, so image ``i`` is row ``i // (M / C)`` even when training has moved its label's argmax to another
    class (DATM's learned soft labels do); when ``M`` is not a multiple of ``C``, the argmax."""
    y = syn.hard_labels().cpu()
    C, M = int(syn.num_classes), len(y)
    if getattr(syn, "soft", False) and M and M % C == 0:
        return torch.arange(M) // (M // C)
    return y


def save_synset_grid(syn, path: str, max_per_class: int = 10) -> str:
    """Writes a PNG grid of the synthetic images: one row per class (:func:`synset_grid_rows`), at most
    ``max_per_class`` per row, pixels shown as in the data (ZCA and normalisation undone). An image whose soft
    label's argmax is not its row's class gets a red frame. Returns ``path``."""
    from torchvision.utils import make_grid, save_image

    x = synset_pixels(syn)
    rows_of = synset_grid_rows(syn)
    drifted = syn.hard_labels().cpu() != rows_of
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    x = x.clone()
    scale = max(1, 64 // max(1, x.shape[-1]))  # make tiny images (8x8 digits) visible
    if scale > 1:
        x = torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest")
    if x.shape[1] == 3 and bool(drifted.any()):
        w = max(1, x.shape[-1] // 16)
        red = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
        for i in torch.nonzero(drifted).flatten().tolist():
            for sl in ((slice(None), slice(0, w)), (slice(None), slice(-w, None)),
                       (slice(0, w), slice(None)), (slice(-w, None), slice(None))):
                x[i, :, sl[0], sl[1]] = red
    C = int(syn.num_classes)
    ncol = max(1, min(max_per_class, max(int((rows_of == c).sum()) for c in range(C)) if len(rows_of) else 1))
    blank = torch.ones_like(x[:1]) if len(x) else torch.ones(1, 3, 8, 8)
    rows: List[torch.Tensor] = []
    for c in range(C):
        xc = x[rows_of == c][:ncol]
        if xc.shape[0] < ncol:
            xc = torch.cat([xc, blank.expand(ncol - xc.shape[0], *blank.shape[1:])])
        rows.append(xc)
    grid = make_grid(torch.cat(rows), nrow=ncol, padding=2, pad_value=1.0)
    with atomic_open(path, "wb") as f:
        save_image(grid, f, format="png")
    return path


# ----------------------------------------------------------------------------------------------------------
# plots
# ----------------------------------------------------------------------------------------------------------
def _save_fig(fig, path: str) -> str:
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    with atomic_open(path, "wb") as f:
        f.write(buf.getvalue())
    return path


def _series(history: Sequence[Dict[str, Any]], key: str) -> Tuple[List[float], List[float]]:
    xs, ys = [], []
    for i, h in enumerate(history):
        v = h.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
            xs.append(float(h.get("iteration", i + 1)))
            ys.append(float(v))
    return xs, ys


def plot_curves(history: Sequence[Dict[str, Any]], out_dir: str,
                round_bounds: Sequence[int] = ()) -> Dict[str, str]:
    """Plots from a distiller's per-iteration ``history`` (list of dicts with ``iteration``):

    - ``loss.png``: ``loss`` over iterations (TAD round boundaries as dashed lines);
    - ``accuracy.png``: every key containing ``acc`` (evaluation during distillation), when present.

    Returns ``{name: path}`` of the files written."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    written: Dict[str, str] = {}
    xs, ys = _series(history, "loss")
    if xs:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(xs, ys, lw=1.0, color="tab:blue", alpha=0.4, label="loss")
        if len(ys) >= 10:
            k = max(2, len(ys) // 25)
            sm = torch.tensor(ys).unfold(0, k, 1).mean(1).tolist()
            ax.plot(xs[k - 1:], sm, lw=1.8, color="tab:blue", label=f"moving mean ({k})")
        for b in round_bounds:
            ax.axvline(b, ls="--", lw=0.8, color="grey")
        ax.set_xlabel("iteration")
        ax.set_ylabel("distillation loss")
        ax.set_title("Distillation loss" + (" (dashed: TAD rounds)" if round_bounds else ""))
        ax.legend(loc="best", fontsize=8)
        ax.grid(alpha=0.3)
        written["loss"] = _save_fig(fig, os.path.join(out_dir, "loss.png"))
    acc_keys = sorted({k for h in history for k in h if "acc" in k.lower()})
    series = [(k, *_series(history, k)) for k in acc_keys]
    series = [s for s in series if s[1]]
    if series:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for k, xs_, ys_ in series:
            ax.plot(xs_, ys_, marker="o", ms=3, label=k)
        ax.set_xlabel("iteration")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title("Accuracy during distillation")
        ax.legend(loc="best", fontsize=8)
        ax.grid(alpha=0.3)
        written["accuracy"] = _save_fig(fig, os.path.join(out_dir, "accuracy.png"))
    return written


def plot_baseline_curves(results: Dict[str, Any], out_dir: str,
                         distilled: Optional[Dict[str, Any]] = None) -> Dict[str, str]:
    """``baseline_curves.png``: the per-epoch test accuracy of every full-data baseline that recorded a curve
    (``results[name]["eval"]["curve"]``; dashed: the held-out noisy-label accuracy), the distilled set's accuracy
    as a horizontal line. Returns ``{"baseline_curves": path}`` or ``{}`` when no baseline has a curve."""
    curves = [(k, r["eval"]) for k, r in results.items()
              if isinstance(r, dict) and isinstance(r.get("eval"), dict) and r["eval"].get("curve")]
    if not curves:
        return {}
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for i, (k, ev) in enumerate(curves):
        color = f"C{i}"
        xs = list(range(1, len(ev["curve"]) + 1))
        ax.plot(xs, ev["curve"], color=color, lw=1.6, label=f"{k}: test")
        if ev.get("holdout_curve"):
            ax.plot(xs, ev["holdout_curve"], color=color, lw=1.0, ls="--", label=f"{k}: held-out (noisy labels)")
    if distilled and distilled.get("mean") is not None:
        ax.axhline(distilled["mean"], color="black", lw=1.2, ls=":", label="distilled set")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Full-data baselines per epoch")
    ax.legend(loc="best", fontsize=7)
    ax.grid(alpha=0.3)
    return {"baseline_curves": _save_fig(fig, os.path.join(out_dir, "baseline_curves.png"))}


def _noise_kind_rate(spec: str) -> Tuple[str, float]:
    """``("sym", 0.4)`` from ``"sym:0.4"``; ``("none", 0.0)`` for ``"none"``."""
    if spec == "none" or ":" not in spec:
        return "none", 0.0
    kind, rate = spec.split(":", 1)
    try:
        return kind, float(rate.split(",")[0])
    except ValueError:
        return kind, float("nan")


def _study_points(cells: Sequence[Dict[str, Any]]) -> Dict[Tuple[str, int], Dict[str, List[Tuple[float, float]]]]:
    """``{(noise kind, ipc): {row: [(rate, mean accuracy)]}}`` from finished sweep cells; the clean runs
    (``none``) join every kind's panel at rate 0. Rows: each method (+ TAD) and each baseline row."""
    panels: Dict[Tuple[str, int], Dict[str, Dict[float, List[float]]]] = {}
    cells = [c for c in cells if c.get("imbalance") is None]  # the noise-rate study is on balanced sets
    kinds = sorted({_noise_kind_rate(str(c["noise"]))[0] for c in cells} - {"none"}) or ["none"]
    for c in cells:
        kind, rate = _noise_kind_rate(str(c["noise"]))
        res = (c.get("metrics") or {}).get("results", {})
        rows = {str(c["method"]).upper() + (" + TAD" if c.get("tad") else ""): res.get("distilled")}
        for b in RESULT_ROWS[1:]:
            if b.startswith("random_subset"):
                continue  # per-method protocol: in the table, not the plot
            rows[BASELINE_TITLES[b]] = result_row(res, b)
        for k in (kinds if kind == "none" else [kind]):
            panel = panels.setdefault((k, int(c["ipc"])), {})
            for name, r in rows.items():
                if r and r.get("mean") is not None:
                    panel.setdefault(name, {}).setdefault(rate, []).append(float(r["mean"]))
    return {key: {name: sorted((rate, sum(v) / len(v)) for rate, v in pts.items()) for name, pts in panel.items()}
            for key, panel in panels.items()}


def long_tail_rows(cells: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per long-tailed sweep cell (``imbalance`` set, per-class accuracies of the distilled set and of the full
    noisy set in its metrics): the head / middle / tail means (:func:`class_groups`) of both, their differences
    and ``tail_minus_head`` = (distilled - full noisy on the tail) - (the same on the head): below 0 when the
    compression costs the tail classes more than the head ones."""
    rows = []
    for c in cells:
        res = (c.get("metrics") or {}).get("results", {})
        d, f = (res.get("distilled") or {}).get("per_class"), (res.get("full_noisy") or {}).get("per_class")
        if c.get("imbalance") is None or not d or not f or len(d) != len(f):
            continue
        groups = class_groups(len(d))
        gd = {k: sum(d[i] for i in v) / len(v) for k, v in groups.items()}
        gf = {k: sum(f[i] for i in v) / len(v) for k, v in groups.items()}
        diff = {k: gd[k] - gf[k] for k in groups}
        rows.append({"method": c.get("method"), "tad": bool(c.get("tad")), "noise": c.get("noise"),
                     "ipc": c.get("ipc"), "imbalance": c.get("imbalance"), "distilled": gd, "full_noisy": gf,
                     "difference": diff,
                     "tail_minus_head": diff["tail"] - diff["head"] if "tail" in diff and "head" in diff else None})
    return rows


def long_tail_text(rows: Sequence[Dict[str, Any]]) -> str:
    """The markdown table of :func:`long_tail_rows` (empty string when there are none)."""
    if not rows:
        return ""
    order = ("head", "middle", "tail")
    three = lambda g: " / ".join(f"{g[k]:.1f}" for k in order if k in g)  # noqa: E731
    lines = ["Long-tailed cells (class 0 the largest; head / middle / tail = the first, middle and last third of "
             "the classes): per-group test accuracy (%), and the distilled set minus the full noisy set (last "
             "epoch). \"tail - head\" below 0: the compression costs the tail classes more than the head ones.", "",
             "| method | noise | IPC | n_min / n_max | distilled: head / middle / tail | full noisy: head / middle / "
             "tail | difference: head / middle / tail | tail - head |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        th = "" if r["tail_minus_head"] is None else f"{r['tail_minus_head']:+.1f}"
        diff = " / ".join(f"{r['difference'][k]:+.1f}" for k in order if k in r["difference"])
        lines.append(f"| {str(r['method']).upper()}{' + TAD' if r['tad'] else ''} | {r['noise']} | {r['ipc']} | "
                     f"{r['imbalance']:g} | {three(r['distilled'])} | {three(r['full_noisy'])} | {diff} | {th} |")
    return "\n".join(lines) + "\n"


def crossover_rates(cells: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per (method, noise kind, IPC): the lowest noise rate at which the distilled set beats the last-epoch
    full-noisy baseline (``None``: at no measured rate), with the rates measured. Rows sorted by kind, IPC,
    method."""
    out: List[Dict[str, Any]] = []
    ref_name = BASELINE_TITLES["full_noisy"]
    for (kind, ipc), panel in sorted(_study_points(cells).items()):
        ref = dict(panel.get(ref_name, []))
        for name, pts in sorted(panel.items()):
            if name in BASELINE_TITLES.values():
                continue
            shared = [(r, a) for r, a in pts if r in ref]
            wins = [r for r, a in shared if a > ref[r]]
            out.append({"method": name, "noise": kind, "ipc": ipc, "crossover": min(wins) if wins else None,
                        "rates": [r for r, _ in shared]})
    return out


def crossover_table(cross: Sequence[Dict[str, Any]]) -> str:
    """Markdown table of :func:`crossover_rates` rows (``"none"``: at no measured rate); "" without rows."""
    if not cross:
        return ""
    rows = [[c["method"], c["noise"], str(c["ipc"]), "none" if c["crossover"] is None else f"{c['crossover']:g}",
             ", ".join(f"{r:g}" for r in c["rates"])] for c in cross]
    return _table(["method", "noise", "IPC", "crossover", "rates measured"], rows)


def plot_noise_study(cells: Sequence[Dict[str, Any]], path: str) -> Optional[str]:
    """Test accuracy against noise rate: one panel per (noise kind, IPC), one line per method and per baseline
    row (dashed), from finished sweep cells. Returns the path written, or None when there is nothing to plot."""
    panels = _study_points(cells)
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    keys = sorted(panels)
    ncol = min(3, len(keys))
    nrow = (len(keys) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.0 * ncol, 3.6 * nrow), squeeze=False)
    names = sorted({n for p in panels.values() for n in p})
    colors = {n: f"C{i % 10}" for i, n in enumerate(names)}
    for ax, key in zip(axes.flat, keys):
        for name, pts in sorted(panels[key].items()):
            base = name in BASELINE_TITLES.values()
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            # a baseline measured at one rate only is a line of one point: draw it as a wide tick
            marker, ms = ("o", 4) if not base else (("_", 14) if len(xs) == 1 else (None, 4))
            ax.plot(xs, ys, marker=marker, ms=ms, lw=1.6 if not base else 1.1, ls="--" if base else "-",
                    color=colors[name], label=name)
        ax.set_title(f"{key[0]} noise, IPC {key[1]}")
        ax.set_xlabel("noise rate")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=7)
    fig.tight_layout(rect=(0, 0.12 if len(labels) > 4 else 0.07, 1, 1))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return _save_fig(fig, path)


def plot_tad_rounds(rounds: Sequence[Dict[str, Any]], out_dir: str, n_train: Optional[int] = None) -> Dict[str, str]:
    """``tad_trusted.png``: the trusted-set size per TAD round (left axis) and, when known, its precision,
    recall and the pseudo-label accuracy (right axis, %). Returns ``{name: path}`` (empty without rounds)."""
    if not rounds:
        return {}
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    r = [int(x.get("round", i)) for i, x in enumerate(rounds)]
    size = [_num(x, "trusted", "n_trusted", "trusted_size") for x in rounds]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if any(v is not None for v in size):
        ax.bar(r, [v or 0 for v in size], color="tab:green", alpha=0.6, label="|trusted|")
        if n_train:
            ax.axhline(n_train, ls="--", lw=0.8, color="grey", label="all samples")
    ax.set_xlabel("TAD round")
    ax.set_ylabel("trusted samples")
    ax.set_xticks(r)
    ax2 = ax.twinx()
    plotted = False
    for key, label in (("precision", "precision"), ("recall", "recall"), ("pseudo_label_accuracy", "pseudo-label acc")):
        vals = [_num(x, key) for x in rounds]
        if any(v is not None for v in vals):
            ax2.plot(r, [100 * v if v is not None and v <= 1.0 else v for v in vals], marker="o", label=label)
            plotted = True
    if plotted:
        ax2.set_ylabel("%")
        ax2.set_ylim(0, 101)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="lower right", fontsize=8)
    ax.set_title("TAD: trusted-set growth per round")
    return {"tad": _save_fig(fig, os.path.join(out_dir, "tad_trusted.png"))}


def _num(d: Dict[str, Any], *keys: str) -> Optional[float]:
    for k in keys:
        v = d.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return None


# ----------------------------------------------------------------------------------------------------------
# report.md
# ----------------------------------------------------------------------------------------------------------
def fmt_acc(r: Optional[Dict[str, Any]]) -> str:
    """``"81.23 ± 0.45"`` for a result dict with mean/std, ``"—"`` otherwise."""
    if not r or r.get("mean") is None:
        return "—"
    return f"{r['mean']:.2f} ± {r.get('std', 0.0):.2f}"


def _mib(b: Optional[float]) -> str:
    return "—" if b is None else f"{b / 2 ** 20:.0f}"


def run_wall_seconds(m: Dict[str, Any]) -> Optional[float]:
    """Wall seconds a run took over all its invocations, from its ``metrics.json`` dict ``m``.

    A run finished in one invocation: its ``total_seconds``. A resumed run (``m["resumed"]``; its
    ``total_seconds`` counts only the last invocation): the sum of its top-level stages' ``seconds`` (``data``,
    ``distill``, ``evaluate``, ``baseline:*``, ...), each recorded by the invocation that ran it; sub-stages such
    as ``distill.prepare`` lie inside their stage and are not added again, and a stage taken from the cross-run
    cache counts 0 s. The time between an interruption and the resume is not counted. None when ``m`` has
    neither figure.
    """
    stages = m.get("stages") or {}
    if m.get("resumed") and stages:
        return float(sum(v.get("seconds") or 0.0 for k, v in stages.items() if "." not in k))
    t = m.get("total_seconds")
    return None if t is None else float(t)


def _minutes(s: Optional[float]) -> str:
    if s is None:
        return "—"
    return f"{s:.0f} s ({s / 60:.1f} min)"


def _secs(s: Optional[float]) -> str:
    """Seconds for a table cell; long durations also in minutes."""
    if s is None:
        return "—"
    if s >= 120:
        return f"{s:.0f} [{s / 60:.1f} min]"
    return f"{s:.1f}"


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(lines)


def _full_noisy_per_class(res: Dict[str, Any]) -> Optional[List[float]]:
    """The full noisy set's per-class accuracies when they pair with the distilled set's (the difference column
    of :func:`per_class_table`), else None."""
    d = (res.get("distilled") or {}).get("per_class")
    fn = (res.get("full_noisy") or {}).get("per_class")
    return fn if d and fn and len(fn) == len(d) else None


def per_class_table(res: Dict[str, Any], classes: Sequence[str], method: str = "distilled",
                    long_tailed: bool = False) -> str:
    """Markdown table of per-class test accuracy: one row per class, one column per result that recorded it
    (``results[key]["per_class"]``), plus distilled minus full noisy when both are there; ``long_tailed``: plus
    the head / middle / tail means (:func:`class_groups`). "" when the distilled set has no per-class figures."""
    d = (res.get("distilled") or {}).get("per_class")
    if not d:
        return ""
    keys = [k for k in RESULT_ROWS if (res.get(k) or {}).get("per_class") and len(res[k]["per_class"]) == len(d)]
    names = {k: (f"{method} distilled" if k == "distilled" else k.replace("_", " ")) for k in keys}
    fn = _full_noisy_per_class(res)
    head = ["class"] + [names[k] for k in keys] + (["distilled - full noisy"] if fn else [])
    rows = []
    for c in range(len(d)):
        name = classes[c] if c < len(classes) else str(c)
        row = [name] + [f"{res[k]['per_class'][c]:.1f}" for k in keys]
        if fn:
            row.append(f"{d[c] - fn[c]:+.1f}")
        rows.append(row)
    if long_tailed:
        for group, idx in class_groups(len(d)).items():
            row = [f"**{group}** (classes {idx[0]}-{idx[-1]})"]
            row += [f"{sum(res[k]['per_class'][c] for c in idx) / len(idx):.1f}" for k in keys]
            if fn:
                row.append(f"{sum(d[c] - fn[c] for c in idx) / len(idx):+.1f}")
            rows.append(row)
    return _table(head, rows)


def class_groups(num_classes: int) -> Dict[str, List[int]]:
    """Head / middle / tail classes of a long-tailed set whose class index orders the sizes (class 0 the
    largest; :func:`ddfast.data.long_tailed_counts`): the first, middle and last third of the indices (the
    middle group takes the remainder: 3 / 4 / 3 for 10 classes)."""
    k = max(1, num_classes // 3)
    idx = list(range(num_classes))
    if num_classes < 3:
        return {"head": idx[:1], "tail": idx[-1:]} if num_classes == 2 else {"head": idx}
    return {"head": idx[:k], "middle": idx[k:num_classes - k], "tail": idx[num_classes - k:]}


def render_report(m: Dict[str, Any]) -> str:
    """``report.md`` text from a metrics dict (see ``ddfast.pipeline`` for the schema)."""
    cfg = m.get("config", {})
    res = m.get("results", {})
    noise = m.get("noise", {})
    ds = m.get("dataset", {})
    method = str(cfg.get("method", "?")).upper() + (" + TAD" if cfg.get("tad") else "")
    out: List[str] = []
    out.append(f"# ddfast run: {method} on {ds.get('name', cfg.get('dataset'))}, noise {noise.get('spec')}, "
               f"IPC {cfg.get('ipc')}")
    out.append("")
    d, rs, fn = res.get("distilled"), res.get("random_subset"), res.get("full_noisy")
    spec = noise.get("spec")
    noisy = "" if spec == "none" else " noisy"
    if d and d.get("mean") is not None and fn and fn.get("mean") is not None:
        diff = d["mean"] - fn["mean"]
        epochs = (fn.get("eval") or {}).get("epochs_trained") or (fn.get("eval") or {}).get("epochs")
        than = (f"training on all {fn.get('n_images', '?')}{noisy} images to the last of {epochs} epochs"
                + (" (what a user without clean labels gets)" if noisy else ""))
        verdict = (f"beats {than} by {diff:.2f} points" if diff > 0 else
                   f"is {-diff:.2f} points below {than}" if diff < 0 else f"ties with {than}")
        out.append(f"**The distilled set ({_sizes(d)}) {verdict}** "
                   f"({fmt_acc(d)} % vs {fmt_acc(fn)} % test accuracy).")
        extra = []
        es, best = result_row(res, "full_noisy@early_stop"), result_row(res, "full_noisy@best_epoch")
        if es:
            extra.append(f"early stopped on held-out{noisy} labels the full set gives {fmt_acc(es)} %")
        if best:
            extra.append(f"at its best epoch, an oracle that peeks at the clean test labels, {fmt_acc(best)} %")
        if extra:
            out.append("Trained on the same images, " + "; ".join(extra) + ".")
    if d and rs and d.get("mean") is not None and rs.get("mean") is not None:
        diff = d["mean"] - rs["mean"]
        stored = rs.get("n_stored") or rs.get("n_images", "?")
        what = f"a random real subset of the same storage ({stored} images) with the{noisy} labels"
        verdict = (f"beats {what} by {diff:.2f} points" if diff > 0 else
                   f"is {-diff:.2f} points below {what}" if diff < 0 else f"ties with {what}")
        line = f"It {verdict} ({fmt_acc(d)} % vs {fmt_acc(rs)} %)"
        rd = res.get("random_subset_decoded")
        if rd and rd.get("mean") is not None:
            dd_ = d["mean"] - rd["mean"]
            line += (f"; against the same storage of random real images decoded as the distilled set is ({fmt_acc(rd)} "
                     f"%: what the decoding alone gives) the difference is {dd_:+.2f} points")
        out.append(line + ".")
    out.append("")
    env = m.get("environment", {})
    load = env.get("load_average_start")
    load_txt = f" (1-min load average {load[0]:.1f} at the start on {env.get('cpu_count')} cores)" if load else ""
    out.append(f"Preset `{cfg.get('preset')}`, seed {cfg.get('seed')}, device `{env.get('device')}`, "
               + (f"total wall time {_minutes(run_wall_seconds(m))} over its invocations (the sum of its stages; "
                  f"this invocation, which resumed an earlier one: {_minutes(m.get('total_seconds'))}){load_txt}"
                  if m.get("resumed") else f"total wall time {_minutes(m.get('total_seconds'))}{load_txt}") + ".")
    out.append("")

    # results
    out.append("## Test accuracy (%)")
    out.append("")
    rows = []
    for key in RESULT_ROWS:
        r = result_row(res, key)
        if not r:
            continue
        title = baseline_title(key, (m.get("noise") or {}).get("spec"))
        if key == "distilled":
            title = f"**{method} distilled set**"
        what = r.get("description", "")
        if r.get("epochs"):
            what += f" (epochs {', '.join(str(e) for e in r['epochs'])})"
        rows.append([title, r.get("n_stored") or r.get("n_images", "—"), r.get("n_images", "—"), what,
                     f"{fmt_acc(r)}", ", ".join(f"{a:.1f}" for a in r.get("accs", [])), _secs(r.get("seconds"))])
    out.append(_table(["training data", "stored images", "training images", "how", "accuracy (mean ± std)",
                       "per run", "seconds"], rows))
    out.append("")
    ev = (res.get("distilled") or {}).get("eval", {})
    if ev:
        out.append(f"Distilled set evaluated with the method's protocol: model `{ev.get('model')}`, loss "
                   f"`{ev.get('loss_resolved', ev.get('loss'))}`, {ev.get('optimizer')} lr {ev.get('lr'):.4g}, "
                   f"{ev.get('epochs')} epochs, DSA {'on' if ev.get('dsa') else 'off'}, {ev.get('num_runs')} runs. "
                   "The test images go through the same input transform as the synthetic images "
                   f"(`{ev.get('transform', 'none')}`).")
        out.append("")
    lt = cfg.get("imbalance")
    per_class = per_class_table(res, ds.get("classes") or [], method, long_tailed=lt is not None)
    if per_class:
        out.append("### Per-class test accuracy (%)")
        out.append("")
        has_diff = _full_noisy_per_class(res) is not None
        out.append("Mean over each row's runs (last epoch for the full-data baselines)"
                   + ("; the difference column is the distilled set minus the last-epoch full noisy set, so a user "
                      "sees which classes the compression costs." if has_diff else
                      "; without the full noisy baseline in this run there is no difference column.")
                   + (f" Long-tailed training set (n_min / n_max = {float(lt):g}, class 0 the largest): the "
                               "last rows average the head, middle and tail classes." if lt is not None else ""))
        out.append("")
        out.append(per_class)
        out.append("")

    # noise
    out.append("## Label noise")
    out.append("")
    out.append(f"- spec `{noise.get('spec')}` (seed {noise.get('seed')}): realised rate "
               f"**{100 * noise.get('realised_rate', 0):.2f} %** ({noise.get('n_flipped')} of {noise.get('n')} labels "
               f"changed)")
    ts = noise.get("transition_summary") or {}
    if ts:
        out.append(f"- realised transition matrix T[clean, noisy]: diagonal mean {ts.get('diag_mean', 0):.3f} "
                   f"(min {ts.get('diag_min', 0):.3f}, class {ts.get('diag_min_class')}); largest off-diagonal "
                   f"{ts.get('offdiag_max', 0):.3f} ({ts.get('offdiag_max_pair')})")
        if ts.get("target_max_abs_diff") is not None:
            out.append(f"- max |realised - intended| entry: {ts['target_max_abs_diff']:.3f}")
    T = noise.get("transition")
    classes = ds.get("classes") or []
    if T and len(T) <= 10:
        names = [str(c) for c in (classes if len(classes) == len(T) else range(len(T)))]
        out.append("")
        out.append("<details><summary>realised transition matrix (rows: clean class, columns: given label)</summary>")
        out.append("")
        out.append(_table(["clean \\ noisy"] + [n[:8] for n in names],
                          [[names[i][:12]] + [f"{v:.2f}" for v in row] for i, row in enumerate(T)]))
        out.append("")
        out.append("</details>")
    out.append("")

    # TAD
    tad = m.get("tad", {})
    if tad.get("enabled"):
        out.append("## TAD (trust-aware diversion) per round")
        out.append("")
        rounds = tad.get("rounds", [])
        if rounds:
            keys = _tad_columns(rounds)
            out.append(_table(["round"] + [k for k in keys],
                              [[r.get("round", i)] + [_fmt_cell(r.get(k)) for k in keys]
                               for i, r in enumerate(rounds)]))
            out.append("")
            out.append("Precision/recall: of the trusted set as a detector of clean labels (ground truth known for "
                       "synthetic noise); pseudo-label accuracy: of the labels TAD gave to recalled samples.")
            per_class = _tad_per_class(rounds[-1], ds.get("classes") or [])
            if per_class:
                out.append("")
                out.append(per_class)
        else:
            out.append("(no rounds recorded)")
        if tad.get("summary"):
            out.append("")
            out.append("Summary: " + ", ".join(f"{k} = {_fmt_cell(v)}" for k, v in tad["summary"].items()))
            why = _tad_divert_sentence(tad, (m.get("config") or {}).get("method"))
            if why:
                out.extend(["", why])
        out.append("")

    if m.get("privacy"):
        from .privacy import render as render_privacy

        out.append(render_privacy(m["privacy"]))

    # stages
    out.append("## Time and peak memory per stage")
    out.append("")
    st = m.get("stages", {})
    srows = []
    for name, s in st.items():
        srows.append([name, _secs(s.get("seconds")), _mib(s.get("peak_memory_bytes")),
                      "cached" if s.get("cached") else ("resumed" if s.get("resumed") else "")])
    out.append(_table(["stage", "seconds", "peak memory (MiB)", "note"], srows))
    out.append("")
    out.append("Peak memory: CUDA allocator peak on a GPU, otherwise the process's peak resident set size so far "
               "(monotone over the stages).")
    out.append("")

    # plots
    files = m.get("files", {})
    if files.get("grid") or files.get("plots"):
        out.append("## Pictures")
        out.append("")
        if files.get("grid"):
            out.append(f"![synthetic images, one row per class]({files['grid']})")
            out.append("")
        for name, p in (files.get("plots") or {}).items():
            out.append(f"![{name}]({p})")
            out.append("")

    # reproduce
    out.append("## Reproduce")
    out.append("")
    cmd = m.get("command")
    if cmd:
        out.append("```")
        out.append(cmd)
        out.append("```")
        out.append("")
    out.append(f"Re-evaluate the saved set: `ddfast evaluate {shlex.quote(files.get('out_dir', '.'))}` "
               "(add `--model resnet18` for a cross-architecture check).")
    out.append("")
    env = m.get("environment", {})
    ext = env.get("extension", {})
    out.append(f"ddfast {env.get('ddfast')}, torch {env.get('torch')}, Python {env.get('python')}, "
               f"{env.get('platform')}; extension: "
               + (f"loaded (CUDA kernels: {ext.get('cuda_kernels')}, archs `{ext.get('cuda_arch_list') or '-'}`)"
                  if ext.get("extension") else f"not loaded ({ext.get('reason')})")
               + f"; {env.get('num_threads')} CPU threads; world size {env.get('world_size', 1)}.")
    out.append("")
    return "\n".join(out)


_TAD_PREFERRED = ("n_trusted", "trusted_fraction", "noise_rate_estimate", "precision", "recall", "n_recalled",
                  "pseudo_label_accuracy", "label_accuracy_after", "posterior_label_accuracy", "cleanlab_precision",
                  "cleanlab_recall", "scorer_accuracy", "start_iteration", "end_iteration", "seconds")


def _tad_per_class(last: Dict[str, Any], classes: Sequence[str]) -> str:
    """The last round's trusted set per class: size, and (clean labels known) precision and coverage."""
    counts = last.get("trusted_per_class")
    if not counts or len(counts) > 100:
        return ""
    names = [str(c) for c in (classes if len(classes) == len(counts) else range(len(counts)))]
    prec, cover = last.get("precision_per_class"), last.get("coverage_per_class")
    diag = last.get("transition_diagonal")
    diag = diag if diag and len(diag) == len(counts) else None
    head = ["class", "trusted"]
    if prec and cover:
        head += ["precision", "coverage of the class"]
    if diag:
        head += ["estimated share of its labels kept (T[c, c])"]
    rows = []
    for c, n in enumerate(counts):
        row = [names[c], n]
        if prec and cover:
            row += [f"{prec[c]:.3f}", f"{cover[c]:.3f}"]
        if diag:
            row += [f"{diag[c]:.3f}"]
        rows.append(row)
    text = [f"Trusted set per class after round {last.get('round', '?')} (by the label the distiller sees)"
            + ("; coverage: the share of all images of the class that are trusted with their true label -- a "
               "class covered only by its easy images is what the diverted distiller learns it from." if prec else ".")
            + (" T[c, c]: the diagonal of the noise transition TAD estimates from its scorer (forward correction, "
               "`divert_pool=\"corrected\"`)" + (f"; its largest row error against the realised noise: "
                                                f"{last['transition_error']:.3f}." if last.get("transition_error")
                                                is not None else ".") if diag else ""),
            "", _table(head, rows)]
    return "\n".join(text)


def _tad_divert_sentence(tad: Dict[str, Any], method: Optional[str]) -> str:
    """What the experts / pool were trained on (empty for RCIG, whose pool trains on the synthetic set) and
    (``divert_pool="auto"``) why, then where the real batches came from when that is not the trusted view."""
    summ, cfg = tad.get("summary") or {}, tad.get("config") or {}
    what = {True: "the trusted view", False: "every image with its given label",
            "relabel": "every image with TAD's pseudo-labels",
            "corrected": "every image with forward loss correction",
            "posterior": "every image with its posterior label (most probable true class given image and given label)",
            "posterior_soft": "every image weighted by its posterior distribution over the true classes (soft "
                              "labels)"}
    text = ""
    if summ.get("divert_pool", "n/a") != "n/a" and method != "rcig":
        text = f"Expert trajectories / model pool trained on {what.get(summ['divert_pool'], str(summ['divert_pool']))}"
        rate, share = summ.get("noise_rate_estimate"), summ.get("min_class_share")
        if cfg.get("divert_pool") == "auto" and summ["divert_pool"] == "posterior" and share is not None:
            text += (f" (`divert_pool=\"auto\"`: the trusted set keeps only {share:.2f} of its smallest class, "
                     f"below {float(cfg.get('divert_min_class_share', 0.2)):.2f})")
        elif cfg.get("divert_pool") == "auto" and rate is not None:
            text += (f" (`divert_pool=\"auto\"`: estimated noise rate {rate:.3f}, threshold "
                     f"{float(cfg.get('divert_noise_rate', 0.5)):.2f} for DATM's experts; pools are always diverted)")
        text += "."
    real = summ.get("divert_real", cfg.get("divert_real", True))
    if real is not True and real in what:
        text += (" " if text else "") + f"Real batches / per-class statistics drawn from {what[real]}"
        share = summ.get("min_class_share")
        if cfg.get("divert_real") == "auto" and real == "posterior" and share is not None:
            text += (f" (`divert_real=\"auto\"`: the trusted set keeps only {share:.2f} of its smallest class, "
                     f"below {float(cfg.get('divert_min_class_share', 0.2)):.2f})")
        text += "."
    return text


def _tad_columns(rounds: Sequence[Dict[str, Any]]) -> List[str]:
    present = []
    for r in rounds:
        for k, v in r.items():
            if k == "round" or k in present:
                continue
            if isinstance(v, (int, float, str, bool)) or v is None or (isinstance(v, dict) and "total" in v):
                present.append(k)
    ordered = [k for k in _TAD_PREFERRED if k in present] + [k for k in present if k not in _TAD_PREFERRED]
    return ordered[:12]


def _fmt_cell(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, dict) and isinstance(v.get("total"), (int, float)):
        return _fmt_cell(float(v["total"]))
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


# ----------------------------------------------------------------------------------------------------------
# sweep table
# ----------------------------------------------------------------------------------------------------------
def _col_noise(c: Dict[str, Any]) -> str:
    """A sweep cell's column label: its noise spec, and ``LT r`` for a long-tailed training set."""
    lt = c.get("imbalance")
    return str(c["noise"]) if lt is None else f"{c['noise']} LT {float(lt):g}"


def sweep_table(cells: Sequence[Dict[str, Any]], md_path: Optional[str] = None,
                csv_path: Optional[str] = None) -> Tuple[str, List[List[str]]]:
    """The papers' table shape from finished sweep cells.

    Each cell: ``{"method", "tad", "noise", "ipc", "seed", "metrics": metrics dict}``. Rows: one per
    ``method (+ TAD)`` and one per baseline (full noisy, random subset, noisy-label learner, clean oracle --
    those present); columns: ``noise @ IPC k``. Entries: mean ± std over seeds' means when there are several
    seeds, else the run's mean ± std over evaluation runs.

    Returns ``(markdown, csv_rows)`` and writes the files when paths are given.
    """
    cols: List[Tuple[str, int]] = []
    for c in cells:
        key = (_col_noise(c), int(c["ipc"]))
        if key not in cols:
            cols.append(key)
    vals: Dict[Tuple[str, Tuple[str, int]], List[Dict[str, Any]]] = {}
    row_order: List[str] = []

    def add(row: str, col, r):
        if r is None or r.get("mean") is None:
            return
        if row not in row_order:
            row_order.append(row)
        vals.setdefault((row, col), []).append(r)

    base_rows: List[str] = []
    seen_base = set()
    for c in cells:
        col = (_col_noise(c), int(c["ipc"]))
        res = (c.get("metrics") or {}).get("results", {})
        name = str(c["method"]).upper() + (" + TAD" if c.get("tad") else "")
        add(name, col, res.get("distilled"))
        for b in RESULT_ROWS[1:]:
            r = result_row(res, b)
            if r is None:
                continue
            title = BASELINE_TITLES[b]
            if b.startswith("random_subset"):  # evaluated with the method's protocol: one row per method
                title = f"{title.split(' (')[0]}, {str(c['method']).upper()} protocol"
            # a baseline does not depend on TAD (nor, except the random subset, on the method):
            # one entry per (row, noise, ipc, seed)
            k = (title, col, c.get("seed"))
            if k in seen_base:
                continue
            seen_base.add(k)
            if title not in base_rows:
                base_rows.append(title)
            add(title, col, r)
    method_rows = [r for r in row_order if r not in base_rows]
    ordered_rows = method_rows + [r for r in base_rows if r in row_order]

    def cell(rs: Optional[List[Dict[str, Any]]]) -> Tuple[str, Optional[float], Optional[float], int]:
        if not rs:
            return "—", None, None, 0
        if len(rs) == 1:
            return fmt_acc(rs[0]), rs[0]["mean"], rs[0].get("std", 0.0), 1
        t = torch.tensor([r["mean"] for r in rs], dtype=torch.float64)
        mean, std = float(t.mean()), float(t.std(unbiased=False))
        return f"{mean:.2f} ± {std:.2f} ({len(rs)} seeds)", mean, std, len(rs)

    header = ["training data"] + [f"{n} @ IPC {k}" for n, k in cols]
    md_rows = []
    csv_rows: List[List[str]] = [["row", "noise", "ipc", "mean", "std", "n"]]
    for row in ordered_rows:
        md = [row]
        for col in cols:
            txt, mean, std, n = cell(vals.get((row, col)))
            # bold the best distilled entry per column
            md.append(txt)
            if mean is not None:
                csv_rows.append([row, col[0], str(col[1]), f"{mean:.4f}", f"{std:.4f}", str(n)])
        md_rows.append(md)
    # bold the best method row per column
    for j, col in enumerate(cols, start=1):
        best, best_i = None, None
        for i, row in enumerate(ordered_rows):
            if row in base_rows:
                continue
            rs = vals.get((row, col))
            if rs:
                m = sum(r["mean"] for r in rs) / len(rs)
                if best is None or m > best:
                    best, best_i = m, i
        if best_i is not None:
            md_rows[best_i][j] = f"**{md_rows[best_i][j]}**"
    md = _table(header, md_rows) + "\n"
    sizes = []  # stored vs training images where they differ (multi-formation), per row and IPC
    for c in cells:
        res = (c.get("metrics") or {}).get("results", {})
        for key, r in res.items():
            if isinstance(r, dict) and r.get("n_stored") and r.get("n_images") and r["n_stored"] != r["n_images"]:
                who = (str(c["method"]).upper() if key == "distilled" else
                       f"{BASELINE_TITLES.get(key, key).split(' (')[0]}, {str(c['method']).upper()} protocol")
                entry = f"{who} at IPC {c['ipc']}: {r['n_stored']} stored images, {r['n_images']} for training"
                if entry not in sizes:
                    sizes.append(entry)
    if sizes:
        md += "\nSizes where storage and training differ (multi-formation): " + "; ".join(sizes) + ".\n"
    if md_path:
        atomic_write_text(md, md_path)
    if csv_path:
        buf = _io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(csv_rows)
        atomic_write_text(buf.getvalue(), csv_path)
    return md, csv_rows
