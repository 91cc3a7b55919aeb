"""``ddfast run`` (:func:`run`), ``ddfast evaluate`` (:func:`evaluate_dir`) and ``ddfast info``
(:func:`environment_info`) as functions."""
from __future__ import annotations

import os
import platform
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

from .. import __version__
from .. import distributed as dd
from .._extension import build_info
from ..baselines import DECODED_SUBSET
from ..data import DatasetNotFoundError, load_dataset
from ..distill.base import SyntheticSet
from ..evaluate import evaluate_synthetic_set, synset_eval_config
from ..io import atomic_write_json, atomic_write_text, load_json
from ..models import MODEL_NAMES, get_model
from ..report import plot_baseline_curves, plot_curves, plot_tad_rounds, render_report, save_synset_grid
from .config import RunConfig, UsageError, resolve, resolve_device
from .stages import (RunContext, RunDir, RunDirLock, StageRunner, baseline_stage, check_run_dir, distill_stage,
                     evaluate_stage, limit_test_set, load_data, make_noise, noise_facts, privacy_audit,
                     privacy_stage, result_dict, say, synset_factor, write_privacy)

__all__ = ["run", "evaluate_dir", "environment_info", "METRICS_SCHEMA"]

METRICS_SCHEMA = "ddfast.metrics/1"


def environment_info(device: Optional[torch.device] = None) -> Dict[str, Any]:
    """Versions, device, extension build info (``ddfast info`` and metrics.json)."""
    import torchvision

    env = {
        "ddfast": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
        "python": platform.python_version(), "platform": platform.platform(terse=True),
        "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "device": str(device) if device is not None else None, "num_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "extension": build_info(), "world_size": dd.world_size(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    return env


def _loadavg() -> Optional[List[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _last(history: Sequence[Dict[str, Any]], key: str) -> Optional[float]:
    for h in reversed(history or []):
        v = h.get(key)
        if isinstance(v, (int, float)):
            return float(v)
    return None


def _check_image_size(train) -> None:
    """Every method distils and evaluates with ConvNet-3 (three conv / norm / pool blocks) at the dataset's
    resolution, so its images must survive three 2x2 poolings; a smaller image is a usage error found before
    the run directory is touched."""
    try:
        get_model("convnet", train.in_channels, train.num_classes, train.im_size, width=1)
    except ValueError as exc:
        h, w = train.im_size
        raise UsageError(f"{train.name}: images of {h}x{w} pixels are too small for ConvNet-3, the network every "
                         f"method trains ({exc}); at least 8x8 pixels are needed") from None


def _start(cfg: RunConfig, argv) -> Optional[RunContext]:
    """Checks everything, loads the data, makes the noise, claims the run directory. None: a finished run."""
    resolved = resolve(cfg)
    dd.init_from_env(resolved.device)
    rd = RunDir(cfg.out)
    runner = StageRunner(rd, resolved.device)
    # data + noise before the run directory is touched: bad arguments leave nothing behind
    train, test = runner.timed("data", lambda: load_data(cfg, resolved.data))
    if train.name != cfg.dataset:  # presets depend on the dataset's canonical name
        resolved = resolve(cfg, dataset_name=train.name)
    noisy = runner.timed("noise", lambda: make_noise(cfg, train))
    _check_image_size(train)
    counts = torch.bincount(noisy.labels, minlength=train.num_classes)
    if int(counts.min()) < cfg.ipc:
        c = int(counts.argmin())
        raise UsageError(f"--ipc {cfg.ipc} is larger than class {c} ({int(counts[c])} samples with that label)")
    lock = RunDirLock(cfg.out).acquire() if dd.is_main() else None
    try:
        resuming = check_run_dir(rd, cfg, argv)
    except BaseException:
        if lock is not None:
            lock.release(failed=True)
        raise
    runner.prev = rd.load("timing")["stages"] if rd.has("timing") else {}
    ctx = RunContext(resolved, rd, runner, train, test, noisy, noise_facts(noisy, cfg.effective_noise_seed),
                     resuming=resuming)
    ctx.lock = lock
    if resuming:
        if os.path.exists(rd.path("report.md")) and os.path.exists(rd.path("metrics.json")):
            m = load_json(rd.path("metrics.json"))
            if m.get("complete") and set(m.get("results", {})) >= {"distilled", *cfg.baselines}:
                say(cfg, f"{rd.out}: finished run (report.md); nothing to do")
                ctx.finished = m
                return ctx
        say(cfg, f"{rd.out}: resuming")
    say(cfg, f"data: {train.name} train {len(train)} x {tuple(train.images.shape[1:])}, test {len(test)}")
    rd.save("noise", ctx.noise)
    say(cfg, f"noise: {ctx.noise['spec']} realised rate {100 * ctx.noise['realised_rate']:.2f} %")
    return ctx


def _write_outputs(ctx: RunContext, results: Dict[str, Any]) -> Dict[str, Any]:
    rd = ctx.rd
    files: Dict[str, Any] = {"out_dir": rd.out, "synset": [SyntheticSet.FILE_TENSORS, SyntheticSet.FILE_META]}
    if not dd.is_main():
        return files
    save_synset_grid(ctx.syn, rd.path("synset_grid.png"), max_per_class=max(ctx.cfg.ipc, 1))
    files["grid"] = "synset_grid.png"
    tad_rounds = ctx.distill_facts.get("tad", {}).get("rounds", [])
    bounds = [int(r["end_iteration"]) for r in tad_rounds if isinstance(r.get("end_iteration"), (int, float))]
    plots = plot_curves(ctx.distill_facts.get("history", []), rd.plots_dir, round_bounds=bounds[:-1])
    plots.update(plot_tad_rounds(tad_rounds, rd.plots_dir, n_train=len(ctx.train)))
    plots.update(plot_baseline_curves(results, rd.plots_dir, distilled=results.get("distilled")))
    files["plots"] = {k: os.path.relpath(v, rd.out) for k, v in plots.items()}
    return files


def _metrics(ctx: RunContext, results: Dict[str, Any], files: Dict[str, Any], t_start: float, load_start):
    cfg, dfacts, syn = ctx.cfg, ctx.distill_facts, ctx.syn
    eval_cfg = synset_eval_config(syn, ctx.r.device, cfg.eval_runs, cfg.seed, ctx.r.eval_overrides)
    return {
        "schema": METRICS_SCHEMA, "complete": True, "command": cfg.command(), "config": cfg.to_dict(),
        "dataset": {"name": ctx.train.name, "n_train": len(ctx.train), "n_test": len(ctx.test),
                    "num_classes": ctx.train.num_classes, "classes": list(ctx.train.classes),
                    "image_shape": list(ctx.train.images.shape[1:]), "source": getattr(ctx.train, "source", "")},
        "noise": dict(ctx.noise),
        "results": results,
        "tad": dfacts.get("tad", {"enabled": cfg.tad, "rounds": []}),
        "distill": {"method": cfg.method, "preset": cfg.preset, "config": dfacts.get("config"),
                    "iterations": dfacts.get("iterations"), "n_images": dfacts.get("n_images"),
                    "label_kind": dfacts.get("label_kind"), "lr": None if syn.lr is None else float(syn.lr),
                    "final_loss": _last(dfacts.get("history", []), "loss"), "eval_config": eval_cfg.to_dict(),
                    "cache_dir": os.path.join(ctx.r.cache_dir, "distill")},
        "baseline_options": ctx.r.baseline.to_dict(),
        "stages": ctx.runner.stages,
        "total_seconds": time.perf_counter() - t_start,
        "resumed": bool(ctx.resuming),
        "environment": {**environment_info(ctx.r.device), "load_average_start": load_start,
                        "load_average_end": _loadavg()},
        "files": files,
    }


def run(cfg: RunConfig, argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Runs (or resumes, or just returns the metrics of a finished) ``cfg``; returns the metrics dict that
    is also written to ``cfg.out/metrics.json`` (:mod:`ddfast.pipeline.stages` lists the stages and files).

    Raises:
        UsageError: bad arguments (unknown method/preset/dataset, bad noise spec or rate, missing label
            file, IPC larger than a class, a bad ``-O`` setting, another run's directory).
        RunConfigMismatch: ``cfg.out`` holds a run with other options.
    """
    t_start, load_start = time.perf_counter(), _loadavg()
    ctx = _start(cfg, argv)
    try:
        return ctx.finished if ctx.finished is not None else _run_stages(ctx, t_start, load_start)
    finally:
        if ctx.lock is not None:
            ctx.lock.release()


def _run_stages(ctx: RunContext, t_start: float, load_start) -> Dict[str, Any]:
    cfg = ctx.cfg
    distill_stage(ctx)
    results: Dict[str, Any] = {"distilled": evaluate_stage(ctx)}
    protocol = synset_eval_config(ctx.syn, ctx.r.device, cfg.eval_runs, cfg.seed, ctx.r.eval_overrides)
    names = list(cfg.baselines)
    if "random_subset" in names and synset_factor(ctx.syn) > 1:  # equal storage and the same decoding
        names.insert(names.index("random_subset") + 1, DECODED_SUBSET)
    for name in names:
        results[name] = baseline_stage(ctx, name, protocol)
    privacy = privacy_stage(ctx) if cfg.privacy else None
    ctx.rd.save("timing", {"stages": ctx.runner.stages})
    files = ctx.runner.timed("report", lambda: _write_outputs(ctx, results))
    if privacy is not None:
        files["privacy"] = ["privacy.json", "privacy.md"] + ([privacy["pairs_picture"]]
                                                             if privacy.get("pairs_picture") else [])
    metrics = _metrics(ctx, results, files, t_start, load_start)
    if privacy is not None:
        metrics["privacy"] = privacy
    if dd.is_main():
        atomic_write_json(metrics, ctx.rd.path("metrics.json"))
        atomic_write_text(render_report(metrics), ctx.rd.path("report.md"))
    dd.barrier()
    say(cfg, f"wrote {ctx.rd.path('report.md')}")
    return metrics


def evaluate_dir(directory: str, *, model: Optional[str] = None, runs: Optional[int] = None, device: str = "auto",
                 dataset: Optional[str] = None, data_root: Optional[str] = None,
                 overrides: Optional[Dict[str, Any]] = None, quiet: bool = False, write: bool = True) -> Dict[str, Any]:
    """Re-evaluates the synthetic set saved in ``directory`` with its protocol (``model`` replaces the network
    for a cross-architecture check, e.g. ``resnet18``). The test set is the one of the run (dataset and
    slicing from the set's metadata, or ``dataset``). Writes ``directory/evaluations/<model>-<runs>runs.json``
    when ``write``. Returns the result dict.

    Raises:
        UsageError: no synthetic set in ``directory``; unknown model; dataset not found; a bad override.
    """
    try:
        syn = SyntheticSet.load(directory)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    dev = resolve_device(device)
    dd.init_from_env(dev)
    meta = (syn.metadata or {}).get("ddfast_run", {})
    name = dataset or meta.get("dataset")
    if not name:
        raise UsageError(f"{directory}: the set does not record its dataset; pass --dataset")
    try:
        test = load_dataset(name, "test", root=data_root or meta.get("data_root"))
    except (DatasetNotFoundError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    limit = (meta.get("data") or {}).get("test_limit")
    if limit and not dataset:
        test = limit_test_set(test, limit)
    ov = dict(overrides or {})
    if model:
        if model.lower() not in MODEL_NAMES:
            raise UsageError(f"unknown model {model!r}; choose one of {list(MODEL_NAMES)}")
        ov["model"] = model
        if model.lower() != str((syn.eval_config or {}).get("model", "convnet")).lower():
            ov.setdefault("model_kwargs", {})
    try:
        ec = synset_eval_config(syn, dev, runs, int(meta.get("seed", 0)), ov)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"evaluation config: {exc}") from None
    res = evaluate_synthetic_set(syn, test, runs=runs, seed=int(meta.get("seed", 0)), device=dev, **ov)
    out = result_dict(res, n_images=int(syn.images.shape[0]), model=ec.model, dataset=name)
    if write and dd.is_main():
        atomic_write_json(out, os.path.join(directory, "evaluations", f"{ec.model}-{ec.num_runs}runs.json"))
    return out


def privacy_dir(directory: str, *, samples: int = 1000, reference_epochs: Optional[int] = None,
                reference: bool = True, device: str = "auto", data_root: Optional[str] = None,
                quiet: bool = False) -> Dict[str, Any]:
    """``ddfast privacy DIR``: the privacy measurements of :mod:`ddfast.privacy` for a finished (or distilled)
    run (a run finished with privacy on has these files already). The run's data, noise and synthetic set are
    rebuilt from ``run.json`` and ``synset.*``; the reference model is the ``full_noisy`` baseline's run 0
    network (:func:`ddfast.baselines.reference_network`; ``reference_epochs`` epochs when given), read from the
    cache or trained here, unless ``reference=False``. Writes ``DIR/privacy.json``, ``DIR/privacy.md`` and
    ``DIR/privacy_pairs.png``; for a finished run it replaces the ``privacy`` entry of ``metrics.json`` and
    renders ``report.md`` again from it. Returns the result dict.

    Raises:
        UsageError: not a run directory, no synthetic set, a bad ``samples`` / ``reference_epochs``.
    """
    if int(samples) < 1:
        raise UsageError(f"--samples must be >= 1, got {samples}")
    if reference_epochs is not None and int(reference_epochs) < 1:
        raise UsageError(f"--reference-epochs must be >= 1, got {reference_epochs}")
    run_json = os.path.join(directory, "run.json")
    if not os.path.isfile(run_json):
        raise UsageError(f"{directory}: not a ddfast run directory (no run.json)")
    try:
        syn = SyntheticSet.load(directory)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    try:
        cfg = RunConfig.from_dict({**load_json(run_json)["config"], "quiet": quiet})
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError(f"{run_json}: unreadable run configuration ({exc})") from None
    if data_root:
        cfg.data_root = data_root
    cfg.device = device
    r = resolve(cfg)
    train, test = load_data(cfg, r.data)
    noisy = make_noise(cfg, train)
    rd = RunDir(directory)
    ctx = RunContext(r, rd, StageRunner(rd, r.device), train, test, noisy,
                     noise_facts(noisy, cfg.effective_noise_seed))
    ctx.syn = syn
    if reference_epochs is not None:
        r.baseline = r.baseline.replace(epochs=int(reference_epochs))
    res = privacy_audit(ctx, samples=int(samples), reference=reference)
    write_privacy(ctx, res)
    mpath = os.path.join(directory, "metrics.json")
    if os.path.isfile(mpath):  # a finished run: its metrics carry the new audit, its report is rendered again
        metrics = {**load_json(mpath), "privacy": res}
        atomic_write_json(metrics, mpath)
        atomic_write_text(render_report(metrics), os.path.join(directory, "report.md"))
    return res
