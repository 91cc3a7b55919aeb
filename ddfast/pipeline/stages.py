"""The stages of ``ddfast run`` and the one helper that runs them with resume, caching and timing.

Stages and where they leave their results (``DIR`` = ``RunConfig.out``)::

    run.json                        written first: the command and the config; a rerun with another config
                                    is refused (RunConfigMismatch)
    data, noise                     recomputed (cheap, deterministic); facts in stages/noise.json
    distill (+ TAD)                 checkpoints/ (every K iterations, per TAD round) -> synset.safetensors +
                                    synset.json (SyntheticSet.save) + stages/distill.json
    evaluate                        stages/evaluate.json
    baseline:<name>                 stages/baseline_<name>.json, also cached across runs in
                                    $DDFAST_CACHE/baselines/<name>-<key digest>.json (full_noisy: also its run
                                    0 network, <name>-<key digest>.model.safetensors)
    privacy                         stages/privacy.json, privacy.json, privacy.md, privacy_pairs.png (the
                                    reference network: full_noisy's run 0, from the cache or trained)
    report                          synset_grid.png, plots/*.png, then metrics.json, then report.md (last:
                                    a directory with report.md is a finished run)

Every file is written atomically; under ``torchrun`` rank 0 writes every file.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from tqdm.auto import tqdm

from .. import __version__
from .. import distributed as dd
from ..baselines import DECODED_SUBSET, describe_baseline, reference_network, run_baseline
from ..data import (DatasetNotFoundError, load_dataset, load_human_labels, long_tailed_indices,
                    sample_per_class)
from ..distill import make_distiller
from ..distill.base import SyntheticSet, TrainSet, peak_memory_bytes
from ..evaluate import evaluate_synthetic_set, synset_eval_config
from ..hashing import digest, tensor_digest
from ..io import (atomic_write_json, atomic_write_text, load_json, load_safetensors, save_safetensors,
                  torch_load_weights_only)
from ..noise import ASYM_MAPPINGS, NoisyLabels, corrupt_labels, parse_noise_spec, transition_matrix
from ..tad import run_tad
from .config import ResolvedRun, RunConfig, RunConfigMismatch, UsageError

__all__ = ["RunDir", "StageRunner", "RunContext", "load_data", "make_noise", "noise_facts", "distill_stage",
           "evaluate_stage", "baseline_stage", "check_run_dir", "synset_factor"]

RUN_SCHEMA = "ddfast.run/1"


def say(cfg: RunConfig, msg: str) -> None:
    """A progress line on stderr (rank 0, unless ``quiet``)."""
    if not cfg.quiet and dd.is_main():
        tqdm.write(msg, file=sys.stderr)


class RunDir:
    """The paths of a run directory."""

    def __init__(self, out: str):
        self.out = os.path.abspath(out)
        self.stages_dir = os.path.join(self.out, "stages")
        self.ckpt_dir = os.path.join(self.out, "checkpoints")
        self.plots_dir = os.path.join(self.out, "plots")

    def path(self, *p: str) -> str:
        return os.path.join(self.out, *p)

    def stage_file(self, name: str) -> str:
        return os.path.join(self.stages_dir, name.replace(":", "_") + ".json")

    def has(self, name: str) -> bool:
        return os.path.exists(self.stage_file(name))

    def load(self, name: str) -> Dict[str, Any]:
        return load_json(self.stage_file(name))

    def save(self, name: str, obj: Dict[str, Any]) -> None:
        if dd.is_main():
            atomic_write_json(obj, self.stage_file(name))


class StageRunner:
    """Runs the stages of one invocation: resume from the run directory, reuse of a cross-run cache entry, wall
    time and peak memory per stage (merged with what earlier invocations recorded in ``stages/timing.json``).

    :meth:`stage` is the one path every resumable stage takes: if the stage finished earlier (``done()``,
    default ``stages/<name>.json`` exists) its result is loaded and flagged ``resumed``; else if a ``cache``
    entry ``(path, key)`` holds a result for the same key it is used and flagged ``cached``; else ``compute()``
    runs, timed, and its result is saved (and cached).
    """

    def __init__(self, rd: RunDir, device: torch.device):
        self.rd, self.device = rd, device
        self.prev: Dict[str, Any] = rd.load("timing")["stages"] if rd.has("timing") else {}
        self.stages: Dict[str, Dict[str, Any]] = {}

    def timed(self, name: str, fn: Callable[[], Any]) -> Any:
        """Runs ``fn`` and records its wall time and peak memory as stage ``name``."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        result = fn()
        self.stages[name] = {"seconds": time.perf_counter() - t0, "peak_memory_bytes": peak_memory_bytes(self.device)}
        return result

    def save_timing(self) -> None:
        self.rd.save("timing", {"stages": {**self.prev, **self.stages}})

    def stage(self, name: str, compute: Callable[[], Dict[str, Any]], *,
              done: Optional[Callable[[], bool]] = None, load: Optional[Callable[[], Dict[str, Any]]] = None,
              cache: Optional[Tuple[str, Dict[str, Any]]] = None) -> Tuple[Dict[str, Any], str]:
        """``(result, how)`` with ``how`` in ``"resumed"``, ``"cached"``, ``"computed"`` (class docstring)."""
        if (done or (lambda: self.rd.has(name)))():
            result = (load or (lambda: self.rd.load(name)))()
            self.stages[name] = dict(self.prev.get(name, {"seconds": result.get("seconds")}), resumed=True)
            return result, "resumed"
        with cache_entry_lock(cache[0]) if cache is not None else contextlib.nullcontext():
            hit = _read_cache(*cache) if cache is not None else None
            if hit is not None:
                self.stages[name] = {"seconds": 0.0, "peak_memory_bytes": peak_memory_bytes(self.device),
                                     "cached": True, "original_seconds": hit.get("seconds")}
                self.rd.save(name, hit)
                return hit, "cached"
            result = self.timed(name, compute)
            self.rd.save(name, result)
            self.save_timing()
            if cache is not None and dd.is_main():
                atomic_write_json({"key": cache[1], "result": result}, cache[0])
        return result, "computed"


def _read_cache(path: str, key: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    if not os.path.exists(path):
        return None
    try:
        entry = load_json(path)
        if entry.get("key") == json.loads(json.dumps(key, default=str)):
            return entry["result"]
    except (ValueError, KeyError, TypeError):
        pass
    return None


@dataclass
class RunContext:
    """Everything the stages of one run share."""

    r: ResolvedRun
    rd: RunDir
    runner: StageRunner
    train: Any
    test: Any
    noisy: Any
    noise: Dict[str, Any]
    resuming: bool = False
    finished: Optional[Dict[str, Any]] = None
    syn: Optional[SyntheticSet] = None
    distill_facts: Dict[str, Any] = field(default_factory=dict)
    lock: Optional["RunDirLock"] = None

    @property
    def cfg(self) -> RunConfig:
        return self.r.cfg


# ----------------------------------------------------------------------------------------------------------
# run directory
# ----------------------------------------------------------------------------------------------------------
def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


LOCK_FILE = ".ddfast.lock"


class RunDirLock:
    """An exclusive lock on a run directory for one process (``OUT/.ddfast.lock``, an OS file lock via ``filelock``,
    released when the process ends, however it ends); ``OUT/.ddfast.lock.owner`` says who holds it.

    Raises (from :meth:`acquire`):
        UsageError: another process holds it (named), or ``OUT`` cannot be created (the reason named).
    """

    def __init__(self, out: str):
        self.out = out
        self.path = os.path.join(out, LOCK_FILE)
        self.created = False
        self._lock = None

    def acquire(self) -> "RunDirLock":
        from filelock import FileLock, Timeout

        self.created = not os.path.exists(self.out)
        try:
            os.makedirs(self.out, exist_ok=True)
            lock = FileLock(self.path)
            lock.acquire(timeout=0)
        except Timeout:
            try:
                with open(self.path + ".owner", encoding="utf-8") as f:
                    owner = f.read().strip()
            except OSError:
                owner = "owner unknown"
            raise UsageError(f"--out {self.out} is in use by another ddfast process ({owner}); wait for it to finish "
                             "or choose another --out") from None
        except OSError as exc:
            raise UsageError(f"--out {self.out}: cannot write there ({exc.strerror or exc})") from None
        self._lock = lock
        try:
            with open(self.path + ".owner", "w", encoding="utf-8") as f:
                f.write(f"pid {os.getpid()} on {platform.node()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        except OSError:
            pass
        return self

    def release(self, failed: bool = False) -> None:
        """Releases the lock; after a failure before any work, also removes a directory this lock created."""
        if self._lock is None:
            return
        for p in (self.path + ".owner",):
            try:
                os.remove(p)
            except OSError:
                pass
        self._lock.release()
        self._lock = None
        if failed and self.created:
            try:
                for p in (self.path,):
                    os.remove(p)
                os.rmdir(self.out)
            except OSError:
                pass


@contextlib.contextmanager
def cache_entry_lock(path: str):
    """Serialises the computation of one cross-run cache entry (``PATH.lock``): a second process needing the same
    entry waits, then reads what the first wrote."""
    from filelock import FileLock

    if not dd.is_main():
        yield
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with FileLock(path + ".lock"):
        yield


def check_run_dir(rd: RunDir, cfg: RunConfig, argv: Optional[List[str]]) -> bool:
    """Writes run.json for a new directory; for an existing one checks the config. Returns True when resuming.

    Raises:
        RunConfigMismatch: the directory holds a run with other options. UsageError: it is not a run directory.
    """
    path = rd.path("run.json")
    ident = cfg.identity()
    # rank 0's view for every rank: a rank looking later could see the run.json rank 0 writes below
    listing = [f for f in os.listdir(rd.out) if not f.startswith(".")] if os.path.isdir(rd.out) else []
    exists, listing = dd.broadcast_object((os.path.exists(path), listing))
    if exists:
        try:
            old = load_json(path).get("identity", {})
        except ValueError as exc:
            raise UsageError(f"{path} is corrupt ({exc}); use another --out") from None
        if old != ident:
            a, b = _flatten(old), _flatten(json.loads(json.dumps(ident, default=str)))
            diff = [f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}" for k in sorted(set(a) | set(b))
                    if a.get(k, "(unset)") != b.get(k, "(unset)")]
            raise RunConfigMismatch(f"{rd.out} holds a run with another configuration ({'; '.join(diff)}); "
                                    "rerun with the same options to resume, or choose another --out")
        return True
    if listing:
        raise UsageError(f"{rd.out} exists and is not a ddfast run directory (no run.json); choose another --out")
    if dd.is_main():
        atomic_write_json({"schema": RUN_SCHEMA, "identity": ident, "config": cfg.to_dict(),
                           "command": cfg.command(), "argv": list(argv) if argv is not None else None,
                           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "ddfast": __version__}, path)
    dd.barrier()
    return False


# ----------------------------------------------------------------------------------------------------------
# data and noise
# ----------------------------------------------------------------------------------------------------------
def load_data(cfg: RunConfig, data_opts) -> Tuple[Any, Any]:
    """``(train, test)`` :class:`ddfast.data.ImageDataset` with the ``data`` slicing applied.

    Raises:
        UsageError: unknown or missing dataset, a corrupt file.
    """
    try:
        train = load_dataset(cfg.dataset, "train", root=cfg.data_root)
        test = load_dataset(cfg.dataset, "test", root=cfg.data_root)
    except (DatasetNotFoundError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    if data_opts.train_per_class:
        # a deterministic, stratified slice (by the clean labels) -- for tests and quick looks
        k = int(data_opts.train_per_class)
        train = train.subset(sample_per_class(train.labels, [k] * train.num_classes, seed=12345))
    if cfg.imbalance is not None and float(cfg.imbalance) < 1.0:
        # long-tailed training set from the clean labels, before the noise (the test set stays balanced)
        train = train.subset(long_tailed_indices(train.labels, train.num_classes, float(cfg.imbalance), cfg.seed))
    if data_opts.test_limit:
        test = limit_test_set(test, data_opts.test_limit)
    return train, test


def limit_test_set(test, limit: int):
    """The seeded random subset of ``limit`` test images that ``-O data.test_limit`` selects."""
    g = torch.Generator().manual_seed(54321)
    return test.subset(torch.randperm(len(test), generator=g)[: int(limit)].sort().values)


def _read_label_file(path: str, n: int) -> torch.Tensor:
    import numpy as np

    try:
        if path.endswith(".npy"):
            arr = torch.as_tensor(np.load(path, allow_pickle=False))
        elif path.endswith(".safetensors"):
            t = load_safetensors(path)
            key = "labels" if "labels" in t else (next(iter(t)) if len(t) == 1 else None)
            if key is None:
                raise ValueError(f"holds {sorted(t)}; expected one tensor or 'labels'")
            arr = t[key]
        elif path.endswith((".pt", ".pth")):
            try:
                obj = torch_load_weights_only(path)
            except OSError:
                raise
            except Exception:  # noqa: BLE001 - corrupt, or objects other than tensors (never loaded unsafely)
                raise ValueError("not a file of plain tensors (torch.load with weights_only=True refused it); save "
                                 "the labels as a tensor with torch.save, or as .npy / .safetensors / .txt") from None
            if isinstance(obj, dict):
                obj = obj.get("labels", obj.get("noisy_labels"))
            arr = torch.as_tensor(obj)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # numpy warns on an empty file; the size check below says it
                arr = torch.as_tensor(np.loadtxt(path, dtype=np.int64, ndmin=1,
                                                 delimiter=None if not path.endswith(".csv") else ","))
    except (OSError, ValueError, RuntimeError, TypeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
        raise UsageError(f"--label-file {path}: cannot read labels ({reason})") from None
    arr = arr.reshape(-1)
    if arr.is_floating_point() or arr.numel() != n:
        raise UsageError(f"--label-file {path}: expected {n} integer labels, got {arr.numel()} {arr.dtype}")
    return arr.long()


def _file_noise(cfg: RunConfig, train):
    C = train.num_classes
    noisy = _read_label_file(cfg.label_file, len(train))
    if int(noisy.min()) < 0 or int(noisy.max()) >= C:
        raise UsageError(f"--label-file {cfg.label_file}: labels outside [0, {C})")
    mask = noisy == train.labels
    return NoisyLabels(labels=noisy, clean_mask=mask, transition=transition_matrix(train.labels, noisy, C),
                       spec=f"file:{os.path.basename(cfg.label_file)}", rate=float((~mask).double().mean()),
                       clean_labels=train.labels)


def make_noise(cfg: RunConfig, train):
    """The :class:`ddfast.noise.NoisyLabels` of the run (synthetic noise, a label file, or CIFAR-N).

    Raises:
        UsageError: a bad spec, a missing or unreadable label file."""
    spec = cfg.noise.strip()
    try:
        if spec.lower() == "file":
            return _file_noise(cfg, train)
        human = None
        if spec.lower().startswith("human:") and cfg.label_file:
            human = load_human_labels(train.num_classes, spec.split(":", 1)[1], path=cfg.label_file)
        key = str(train.name).lower()
        mapping = key if spec.lower().startswith("asym") and key in ASYM_MAPPINGS else None
        return corrupt_labels(train.labels, spec, train.num_classes, seed=cfg.effective_noise_seed,
                              images=train.images, mapping=mapping, human_root=cfg.data_root, human_labels=human)
    except FileNotFoundError as exc:
        raise UsageError(f"--noise {spec}: {exc}") from None
    except (ValueError, TypeError) as exc:
        if isinstance(exc, UsageError):
            raise
        raise UsageError(f"--noise {spec}: {exc}") from None


def noise_facts(noisy, seed: int) -> Dict[str, Any]:
    """The JSON facts of the noisy labels (rates, realised transition matrix, digest)."""
    T = noisy.transition.double()
    C = T.shape[0]
    diag = torch.diagonal(T)
    off = T.clone()
    off.fill_diagonal_(-1.0)
    flat = int(off.argmax())
    facts = {
        "spec": noisy.spec, "seed": int(seed), "n": int(noisy.labels.numel()),
        "n_flipped": int((~noisy.clean_mask).sum()), "realised_rate": float(noisy.rate),
        "transition": [[round(float(v), 6) for v in row] for row in T.tolist()],
        "transition_summary": {
            "diag_mean": float(diag.mean()), "diag_min": float(diag.min()), "diag_min_class": int(diag.argmin()),
            "offdiag_max": float(off.max()), "offdiag_max_pair": [flat // C, flat % C],
        },
        "labels_digest": tensor_digest(noisy.labels),
    }
    try:
        facts["target_rate"] = float(parse_noise_spec(noisy.spec).rate)
    except (ValueError, TypeError):
        facts["target_rate"] = None
    if getattr(noisy, "target_transition", None) is not None:
        facts["transition_summary"]["target_max_abs_diff"] = float((T - noisy.target_transition.double()).abs().max())
    return facts


# ----------------------------------------------------------------------------------------------------------
# distillation (+ TAD)
# ----------------------------------------------------------------------------------------------------------
def _progress_callback(ctx: RunContext):
    """With ``eval_every > 0`` in the distiller's config: every ``eval_every`` iterations the current synthetic
    set is evaluated (the method's protocol, 1 run, at most ``eval.progress_epochs`` epochs) and ``test_acc`` is
    added to that iteration's history entry (checkpointed with it; plotted as accuracy over iterations)."""
    every = int(getattr(ctx.r.distill, "eval_every", 0) or 0)
    if every <= 0:
        return None
    def callback(distiller, metrics):
        if distiller.iteration % every:
            return
        syn = distiller.synthetic_set()
        ec = synset_eval_config(syn, ctx.r.device, 1, ctx.cfg.seed, ctx.r.eval_overrides)
        ov = dict(ctx.r.eval_overrides, epochs=max(1, min(ec.epochs, ctx.r.progress_epochs)))
        res = evaluate_synthetic_set(syn, ctx.test, runs=1, seed=ctx.cfg.seed, device=ctx.r.device, **ov)
        metrics["test_acc"] = float(res.mean)

    return callback


def _distill(ctx: RunContext) -> Tuple[SyntheticSet, Dict[str, Any]]:
    """Distils (with TAD when asked): ``(synthetic set, facts)``."""
    cfg, r = ctx.cfg, ctx.r
    ts = TrainSet(images=ctx.train.images, labels=ctx.noisy.labels, num_classes=ctx.train.num_classes,
                  mean=ctx.train.mean, std=ctx.train.std, name=ctx.train.name)
    try:
        ts.check_ipc(cfg.ipc)
    except ValueError as exc:
        raise UsageError(f"--ipc {cfg.ipc}: {exc}") from None
    quiet = cfg.quiet or not dd.is_main()
    distiller = make_distiller(cfg.method, r.distill, device=r.device,
                               cache_dir=os.path.join(r.cache_dir, "distill"), quiet=quiet)
    os.makedirs(ctx.rd.ckpt_dir, exist_ok=True)
    callback = _progress_callback(ctx)
    tad_info: Dict[str, Any] = {"enabled": bool(cfg.tad), "rounds": []}
    t0 = time.perf_counter()
    if cfg.tad:
        result = run_tad(distiller, ts, r.tad, clean_labels=ctx.noisy, checkpoint_dir=ctx.rd.ckpt_dir, resume=True,
                         quiet=quiet, callback=callback)
        syn = result.synset
        tad_info.update(config=r.tad.to_dict(), rounds=[_jsonable(x) for x in result.rounds],
                        summary=_jsonable(result.summary))
    else:
        syn = distiller.run(ts, checkpoint_dir=ctx.rd.ckpt_dir, resume=True, callback=callback)
    facts = {"config": r.distill.to_dict(), "iterations": int(distiller.iteration),
             "seconds": time.perf_counter() - t0, "peak_memory_bytes": peak_memory_bytes(r.device),
             "substages": {f"distill.{k}": dict(v) for k, v in distiller.timer.stages.items()},
             "history": list(distiller.history), "tad": tad_info, "n_images": int(syn.images.shape[0]),
             "label_kind": "soft" if syn.soft else "hard"}
    return syn, facts


def _jsonable(v):
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return v.item() if hasattr(v, "item") else str(v)


def distill_stage(ctx: RunContext) -> None:
    """Distils (or resumes, or loads the finished set) and sets ``ctx.syn`` / ``ctx.distill_facts``."""
    cfg, rd = ctx.cfg, ctx.rd
    computed: Dict[str, SyntheticSet] = {}

    def compute() -> Dict[str, Any]:
        say(cfg, f"distill: {cfg.method}{' + TAD' if cfg.tad else ''} ({cfg.preset}) IPC {cfg.ipc} on "
                 f"{ctx.r.device}")
        syn, facts = _distill(ctx)
        syn.metadata = dict(syn.metadata or {})
        syn.metadata["ddfast_run"] = {
            "dataset": ctx.train.name, "data_root": cfg.data_root, "data": cfg.overrides.get("data", {}),
            "noise": ctx.noise["spec"], "noise_seed": ctx.noise["seed"], "realised_rate": ctx.noise["realised_rate"],
            "method": cfg.method, "tad": cfg.tad, "preset": cfg.preset, "seed": cfg.seed, "command": cfg.command()}
        if dd.is_main():
            syn.save(rd.out)
        computed["syn"] = syn
        return facts

    done = lambda: rd.has("distill") and os.path.exists(rd.path(SyntheticSet.FILE_META))  # noqa: E731
    facts, how = ctx.runner.stage("distill", compute, done=done)
    if how == "resumed":
        say(cfg, f"distill: done earlier ({rd.path(SyntheticSet.FILE_TENSORS)})")
    ctx.syn = computed.get("syn") or SyntheticSet.load(rd.out)
    ctx.distill_facts = facts
    for k, v in facts.get("substages", {}).items():
        ctx.runner.stages.setdefault(k, v)


# ----------------------------------------------------------------------------------------------------------
# evaluation and baselines
# ----------------------------------------------------------------------------------------------------------
def result_dict(res, **extra) -> Dict[str, Any]:
    """An :class:`~ddfast.evaluate.EvalResult` as the JSON row of ``metrics.json``."""
    d = {"mean": float(res.mean), "std": float(res.std), "accs": [float(a) for a in res.accs],
         "seconds": float(res.seconds), "eval": res.config}
    if getattr(res, "per_class", None) is not None:
        d["per_class"] = [float(a) for a in res.per_class]
    d.update(extra)
    return d


def _progress_bar(cfg: RunConfig, total: int, desc: str, unit: str):
    return tqdm(total=total, desc=desc, unit=unit, disable=cfg.quiet or not dd.is_main(), leave=False,
                dynamic_ncols=True)


def evaluate_stage(ctx: RunContext) -> Dict[str, Any]:
    """The distilled set's test accuracy with its own protocol (``num_runs`` runs)."""
    cfg, syn = ctx.cfg, ctx.syn
    eval_cfg = synset_eval_config(syn, ctx.r.device, cfg.eval_runs, cfg.seed, ctx.r.eval_overrides)

    def compute() -> Dict[str, Any]:
        say(cfg, f"evaluate: {eval_cfg.num_runs} x {eval_cfg.model}, {eval_cfg.epochs} epochs")
        bar = _progress_bar(cfg, eval_cfg.num_runs, "eval distilled", "run")
        res = evaluate_synthetic_set(syn, ctx.test, runs=cfg.eval_runs, seed=cfg.seed, device=ctx.r.device,
                                     log=lambda s: bar.update(1), **ctx.r.eval_overrides)
        bar.close()
        kind = "soft" if syn.soft else "hard"
        desc = (f"{cfg.method}{' + TAD' if cfg.tad else ''}, {kind} labels"
                + (f", learned lr {float(syn.lr):.4g}" if syn.lr is not None else ""))
        return result_dict(res, n_images=int(syn.images.shape[0]), n_stored=int(syn.ipc * syn.num_classes),
                           factor=synset_factor(syn), label_kind=kind, description=desc)

    distilled, _ = ctx.runner.stage("evaluate", compute)
    say(cfg, f"distilled: {distilled['mean']:.2f} +- {distilled['std']:.2f} %")
    return distilled


def _baseline_key(ctx: RunContext, name: str, subset_cfg) -> Dict[str, Any]:
    """What a cached baseline result depends on (the random subset: the configuration it trains with, so a
    learned lr that it does not use does not split the cache)."""
    cfg = ctx.cfg
    key = {"baseline": name, "dataset": ctx.train.name, "n_train": len(ctx.train), "noise": ctx.noise["spec"],
           "noise_seed": ctx.noise["seed"], "labels": ctx.noise["labels_digest"],
           "data": cfg.overrides.get("data", {}), "seed": int(cfg.seed), "ddfast": __version__}
    if name in ("random_subset", DECODED_SUBSET):
        key.update({"ipc": cfg.ipc, "factor": synset_factor(ctx.syn) if name == DECODED_SUBSET else 1, "eval": {k: v for k, v in subset_cfg.to_dict().items() if k != "device"},
                    "transform": getattr(ctx.syn.input_transform(), "kind", "none"),
                    "random_lr": ctx.r.baseline.random_lr})
    else:
        opts = ctx.r.baseline.to_dict()
        opts.pop("random_lr")
        if name != "gce":
            opts.pop("gce_q")
        if name != "coteaching":
            opts.pop("coteaching_forget")
            opts.pop("coteaching_tk")
        key["options"] = opts
    return key


def synset_factor(syn) -> int:
    """The multi-formation factor of a synthetic set (``f``: each stored image decodes into ``f^2`` training
    images; 1 for the methods without multi-formation)."""
    return int((syn.metadata or {}).get("factor", 1) or 1)


def baseline_stage(ctx: RunContext, name: str, protocol) -> Dict[str, Any]:
    """One baseline (:func:`ddfast.baselines.run_baseline`), resumed or taken from the cache when possible."""
    cfg, b = ctx.cfg, ctx.r.baseline
    subset_cfg = b.subset_eval_config(protocol, learned_lr=ctx.syn.lr is not None)
    key = _baseline_key(ctx, name, subset_cfg)
    cache = (os.path.join(ctx.r.cache_dir, "baselines", f"{name}-{digest(key)}.json"), key)

    def compute() -> Dict[str, Any]:
        say(cfg, f"baseline {name} ...")
        subset = name in ("random_subset", DECODED_SUBSET)
        total = subset_cfg.num_runs if subset else b.epochs * len(dd.shard_indices(b.num_runs))
        bar = _progress_bar(cfg, total, f"baseline {name}", "run" if subset else "epoch")
        keep: Optional[list] = [] if name == "full_noisy" else None
        res = run_baseline(name, ctx.train, ctx.noisy, ctx.test, config=b, ipc=cfg.ipc, subset_config=subset_cfg,
                           transform=ctx.syn.input_transform(), device=ctx.r.device, seed=cfg.seed,
                           factor=synset_factor(ctx.syn), progress=lambda: bar.update(1), keep_model=keep)
        bar.close()
        if keep and dd.is_main():  # the privacy audit's reference network, saved beside the cached result
            save_safetensors(keep[0].state_dict(), reference_model_path(ctx))
        f = synset_factor(ctx.syn) if name == DECODED_SUBSET else 1
        n = cfg.ipc * ctx.train.num_classes if subset else len(ctx.train)
        return result_dict(res, n_images=int(n * f * f), n_stored=int(n), description=describe_baseline(
            name, b, res, ipc=cfg.ipc, noise_spec=str(ctx.noisy.spec)))

    result, how = ctx.runner.stage(f"baseline:{name}", compute, cache=cache)
    if how == "cached":
        say(cfg, f"{name}: cached {result['mean']:.2f} % ({cache[0]})")
    elif how == "computed":
        say(cfg, f"{name}: {result['mean']:.2f} +- {result['std']:.2f} %")
    return result


# ----------------------------------------------------------------------------------------------------------
# privacy
# ----------------------------------------------------------------------------------------------------------
#: members, non-members and test references of the privacy audit
PRIVACY_SAMPLES = 1000


def reference_model_path(ctx: RunContext) -> str:
    """Where the ``full_noisy`` baseline's run 0 network of this run's noisy labels and protocol is cached."""
    key = _baseline_key(ctx, "full_noisy", None)
    return os.path.join(ctx.r.cache_dir, "baselines", f"full_noisy-{digest(key)}.model.safetensors")


def reference_model(ctx: RunContext):
    """``(model, transform, member_idx)`` of :func:`ddfast.baselines.reference_network`: the ``full_noisy``
    baseline's run 0 network, read from the cache (saved when the baseline was trained) or trained here and
    cached."""
    cfg, b = ctx.cfg, ctx.r.baseline
    path = reference_model_path(ctx)
    with cache_entry_lock(path):
        state = None
        if os.path.exists(path):
            try:
                state = load_safetensors(path)
            except (OSError, ValueError):
                state = None  # corrupt: train it again
        if state is None:
            say(cfg, f"privacy: training the reference network (the full_noisy baseline's run 0: {b.epochs} epochs "
                     f"on the {len(ctx.train)} noisy images minus {100 * b.holdout:g} % held out)")
        try:
            out = reference_network(ctx.train, ctx.noisy, config=b, device=ctx.r.device, seed=cfg.seed, state=state)
        except RuntimeError:  # a state dict of another architecture (an older build): train it again
            if state is None:
                raise
            state = None
            out = reference_network(ctx.train, ctx.noisy, config=b, device=ctx.r.device, seed=cfg.seed)
        if state is None and dd.is_main():
            save_safetensors(out[0].state_dict(), path)
    return out


def privacy_audit(ctx: RunContext, samples: int = PRIVACY_SAMPLES, reference: bool = True) -> Dict[str, Any]:
    """The privacy measurements of :func:`ddfast.privacy.audit` for the run's synthetic set (``ctx.syn``), with
    the ``full_noisy`` baseline's network as reference (``reference``); writes ``privacy_pairs.png``."""
    from ..privacy import audit

    cfg, b = ctx.cfg, ctx.r.baseline
    model, norm, members = reference_model(ctx) if reference else (None, None, None)
    say(cfg, "privacy: nearest training images and membership inference")
    res = audit(ctx.syn, ctx.train, ctx.noisy.labels, ctx.test, n_samples=int(samples), seed=cfg.seed,
                device=str(ctx.r.device), reference_model=model, reference_transform=norm, member_pool=members,
                pairs_path=ctx.rd.path("privacy_pairs.png"), eval_overrides=ctx.r.eval_overrides)
    res["reference"] = None if model is None else {
        "what": "the full_noisy baseline's run 0", "width": int(b.width), "epochs": int(b.epochs),
        "n_train": int(members.numel()), "holdout": float(b.holdout)}
    return res


def write_privacy(ctx: RunContext, res: Dict[str, Any]) -> None:
    """``privacy.json`` and ``privacy.md`` (:func:`ddfast.privacy.render`) in the run directory."""
    from ..privacy import render

    if dd.is_main():
        atomic_write_json(res, ctx.rd.path("privacy.json"))
        atomic_write_text(render(res), ctx.rd.path("privacy.md"))


def privacy_stage(ctx: RunContext) -> Dict[str, Any]:
    """The ``privacy`` stage of a run (resumable): :func:`privacy_audit`, then :func:`write_privacy`."""
    res, _ = ctx.runner.stage("privacy", lambda: privacy_audit(ctx))
    write_privacy(ctx, res)
    return res
