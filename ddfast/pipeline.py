"""The main job as an API: noisy data -> distilled set (+ TAD) -> evaluation -> baselines -> report.

``run(RunConfig(...)) -> metrics dict`` is what ``ddfast run`` does; ``evaluate_dir`` is ``ddfast evaluate``
and ``environment_info`` is ``ddfast info``.

Stages and where they leave their results (``DIR`` = ``RunConfig.out``)::

    run.json                        written first: the command and the config; a rerun with another config
                                    is refused (RunConfigMismatch)
    data, noise                     recomputed (cheap, deterministic); facts in stages/noise.json
    distill (+ TAD)                 checkpoints/ (every K iterations, per TAD round) -> synset.safetensors +
                                    synset.json (SyntheticSet.save) + stages/distill.json
    evaluate                        stages/evaluate.json
    baseline:<name>                 stages/baseline_<name>.json, also cached across runs in
                                    $DDFAST_CACHE/baselines/<key>.json
    report                          synset_grid.png, plots/*.png, then metrics.json, then report.md (last:
                                    a directory with report.md is a finished run)

Every file is written atomically. Rerunning the same command resumes: finished stages are read back, the
distiller resumes from its checkpoint (exactly: Distiller.run restores the generator state), TAD from its
last finished round.

Caches (``$DDFAST_CACHE``, default ``~/.cache/ddfast``): ``distill/`` is the distillers' ``cache_dir``
(expert trajectories, model pools -- keyed by the distiller from the dataset, the labels it sees including
TAD's trusted set and pseudo-labels, and its config); ``baselines/`` holds baseline results keyed by dataset,
noise spec + seed (and a digest of the noisy labels), IPC, seed and the baseline's config.

Under ``torchrun`` (``ddfast.distributed``) evaluation runs and baselines are sharded over the ranks and
rank 0 writes every file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import __version__
from . import distributed as dd
from .io import atomic_write_json, atomic_write_text, load_json

__all__ = [
    "RunConfig",
    "RunConfigMismatch",
    "UsageError",
    "run",
    "evaluate_dir",
    "environment_info",
    "default_cache_dir",
    "BASELINES",
    "DEFAULT_BASELINES",
    "DEMO",
    "OVERRIDE_SECTIONS",
    "parse_overrides",
    "resolve_device",
]

BASELINES = ("full_noisy", "random_subset", "noisy_learner", "full_clean")
DEFAULT_BASELINES = ("full_noisy", "random_subset", "noisy_learner")
OVERRIDE_SECTIONS = ("distill", "tad", "eval", "baseline", "data")
METRICS_SCHEMA = "ddfast.metrics/1"
RUN_SCHEMA = "ddfast.run/1"


class UsageError(ValueError):
    """A bad argument of a run (unknown dataset/method/preset, bad rate or IPC, missing file...)."""


class RunConfigMismatch(UsageError):
    """The output directory holds a run with another configuration."""


# ----------------------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------------------
@dataclass
class RunConfig:
    """One ``ddfast run``.

    Attributes:
        dataset: a :func:`ddfast.data.load_dataset` name (or a user file).
        noise: a :func:`ddfast.noise.parse_noise_spec` spec (``sym:0.4``, ``asym:0.4``, ``idn:0.2``,
            ``human:worse``, ``none``) or ``file`` with ``label_file``.
        method: ``datm`` | ``dance`` | ``rcig`` (any name in ``ddfast.distill.METHODS``).
        tad: wrap the distiller in TAD (``ddfast.tad.run_tad``).
        ipc: images per class of the distilled set (and of the random-subset baseline).
        preset: ``quick`` | ``full`` (the distiller's preset).
        seed: seed of the distiller, the evaluation runs, the subset draw and the baselines.
        noise_seed: seed of the label corruption (default: ``seed``).
        label_file: noisy labels from a file: with ``noise="human:KEY"`` a CIFAR-N ``*_human.pt``; with
            ``noise="file"`` a ``.pt``/``.npy``/``.safetensors``/``.txt`` holding one label per training image.
        out: the run directory.
        device: ``cpu`` | ``cuda`` | ``auto``.
        eval_runs: number of evaluation runs of the distilled set and the random subset (default: the
            method's protocol).
        baselines: which baselines to run (:data:`BASELINES`).
        data_root: extra folder searched for the dataset files.
        cache_dir: default ``$DDFAST_CACHE`` or ``~/.cache/ddfast``.
        overrides: ``{"distill"|"tad"|"eval"|"baseline"|"data": {key: value}}`` -- distiller config fields
            (``make_config(..., **overrides)``), ``run_tad`` keywords, :class:`ddfast.evaluate.EvalConfig`
            fields for the distilled-set evaluation, the baselines' budget (:data:`BASELINE_DEFAULTS`), and
            data slicing (``train_per_class``, ``test_limit``).
        quiet: no progress bars, only errors.
    """

    dataset: str = "fashion-mnist"
    noise: str = "sym:0.4"
    method: str = "datm"
    tad: bool = True
    ipc: int = 10
    preset: str = "quick"
    seed: int = 0
    noise_seed: Optional[int] = None
    label_file: Optional[str] = None
    out: str = os.path.join("runs", "demo")
    device: str = "auto"
    eval_runs: Optional[int] = None
    baselines: Tuple[str, ...] = DEFAULT_BASELINES
    data_root: Optional[str] = None
    cache_dir: Optional[str] = None
    overrides: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    quiet: bool = False

    # fields that do not change the result (a resumed run may differ in them)
    _NON_IDENTITY = ("out", "device", "cache_dir", "quiet", "data_root", "baselines")

    def identity(self) -> Dict[str, Any]:
        """The fields a resumed run must share with the run that started the directory."""
        d = dataclasses.asdict(self)
        for k in self._NON_IDENTITY:
            d.pop(k, None)
        d["noise_seed"] = self.effective_noise_seed
        d["label_file"] = os.path.abspath(self.label_file) if self.label_file else None
        d["overrides"] = {k: dict(sorted(v.items())) for k, v in sorted(self.overrides.items()) if v}
        return d

    @property
    def effective_noise_seed(self) -> int:
        return int(self.seed if self.noise_seed is None else self.noise_seed)

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["baselines"] = list(self.baselines)
        return d

    def command(self) -> str:
        """The equivalent ``ddfast run`` command line."""
        parts = ["ddfast", "run", "--dataset", self.dataset, "--noise", self.noise, "--method", self.method]
        if self.tad:
            parts.append("--tad")
        parts += ["--ipc", str(self.ipc), "--preset", self.preset, "--seed", str(self.seed), "--out", self.out]
        if self.noise_seed is not None:
            parts += ["--noise-seed", str(self.noise_seed)]
        if self.label_file:
            parts += ["--label-file", self.label_file]
        if self.device != "auto":
            parts += ["--device", self.device]
        if self.eval_runs is not None:
            parts += ["--eval-runs", str(self.eval_runs)]
        if tuple(self.baselines) != DEFAULT_BASELINES:
            parts += ["--baselines", ",".join(self.baselines) or "none"]
        if self.data_root:
            parts += ["--data-root", self.data_root]
        for sec, kv in sorted(self.overrides.items()):
            for k, v in sorted(kv.items()):
                parts += ["--override", f"{sec}.{k}={json.dumps(v) if not isinstance(v, str) else v}"]
        return " ".join(shlex.quote(p) for p in parts)


#: the demo: ``ddfast run`` with no arguments (see README "Quick start"); the overrides of the demo are
#: listed in DEMO_OVERRIDES and documented in the README.
DEMO_OVERRIDES: Dict[str, Dict[str, Any]] = {}
DEMO = RunConfig()

#: baseline budget (``--override baseline.KEY=VALUE``): the full-data baselines train a small ConvNet for a
#: few epochs (a 2-core CPU budget; early stopping is also what keeps a network from memorising the noise)
BASELINE_DEFAULTS: Dict[str, Any] = {
    "epochs": 3,            # epochs of the full-data baselines (full noisy / clean / noisy-label learner)
    "width": 32,            # ConvNet-3 width of the full-data baselines
    "num_runs": 1,          # runs of the full-data baselines
    "batch_size": 128,      # SGD momentum 0.9, wd 5e-4, cosine decay per step (benchmarks/bench_baselines.py)
    "lr": 0.02,
    "learner": "gce",       # the noisy-label learner: ddfast.baselines.gce (Zhang & Sabuncu 2018)
    "gce_q": 0.7,
    "random_lr": 0.01,      # lr of the random subset when the method's protocol uses a learned lr
}


def parse_overrides(items: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """``["distill.iterations=20", "eval.epochs=50", "lr_img=100"]`` -> ``{"distill": {...}, "eval": {...}}``.
    Values are parsed as YAML scalars/lists (``20`` -> int, ``0.1`` -> float, ``true``, ``[1, 2]``); a key
    without a section goes to ``distill``.

    Raises:
        UsageError: an item without ``=`` or an unknown section.
    """
    import yaml

    out: Dict[str, Dict[str, Any]] = {}
    for item in items or ():
        if "=" not in item:
            raise UsageError(f"--override {item!r}: expected KEY=VALUE (e.g. distill.iterations=20)")
        key, _, raw = item.partition("=")
        key = key.strip()
        sec, dot, name = key.partition(".")
        if not dot:
            sec, name = "distill", key
        if sec not in OVERRIDE_SECTIONS or not name:
            raise UsageError(f"--override {item!r}: section must be one of {list(OVERRIDE_SECTIONS)}")
        try:
            val = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            val = raw
        out.setdefault(sec, {})[name] = val
    return out


def default_cache_dir() -> str:
    """``$DDFAST_CACHE`` or ``~/.cache/ddfast``."""
    return os.path.expanduser(os.environ.get("DDFAST_CACHE") or os.path.join("~", ".cache", "ddfast"))


def resolve_device(device: str) -> torch.device:
    """``auto`` -> ``cuda`` when available else ``cpu``; ``cuda`` without a GPU raises UsageError; under
    torchrun ``cuda`` becomes ``cuda:LOCAL_RANK``."""
    d = str(device or "auto").lower()
    if d == "auto":
        d = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(d)
    except RuntimeError as exc:
        raise UsageError(f"--device {device!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    return dd.device_for_rank(dev)


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------
def _digest(obj: Any, n: int = 16) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def _tensor_digest(t: torch.Tensor, n: int = 16) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:n]


def _say(cfg: RunConfig, msg: str) -> None:
    if not cfg.quiet and dd.is_main():
        from tqdm.auto import tqdm

        tqdm.write(msg, file=sys.stderr)


def _peak_memory(device: torch.device) -> int:
    from .distill.base import peak_memory_bytes

    return peak_memory_bytes(device)


class _Stages:
    """Wall time and peak memory per pipeline stage (merged with what earlier sessions recorded)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stages: Dict[str, Dict[str, Any]] = {}

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        result = fn()
        self.stages[name] = {"seconds": time.perf_counter() - t0, "peak_memory_bytes": _peak_memory(self.device)}
        return result

    def record(self, name: str, entry: Dict[str, Any]) -> None:
        self.stages[name] = dict(entry)


class _RunDir:
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


# ----------------------------------------------------------------------------------------------------------
# validation (bad arguments -> UsageError, before anything expensive)
# ----------------------------------------------------------------------------------------------------------
def _validate(cfg: RunConfig) -> None:
    from .distill import METHODS, PRESETS
    from .noise import parse_noise_spec

    if cfg.method.lower() not in METHODS:
        raise UsageError(f"unknown method {cfg.method!r}; choose one of {sorted(METHODS)}")
    if cfg.preset not in PRESETS:
        raise UsageError(f"unknown preset {cfg.preset!r}; choose one of {list(PRESETS)}")
    if isinstance(cfg.ipc, bool) or not isinstance(cfg.ipc, int) or cfg.ipc < 1:
        raise UsageError(f"--ipc must be a positive integer, got {cfg.ipc!r}")
    if cfg.eval_runs is not None and cfg.eval_runs < 1:
        raise UsageError(f"--eval-runs must be >= 1, got {cfg.eval_runs}")
    bad = [b for b in cfg.baselines if b not in BASELINES]
    if bad:
        raise UsageError(f"unknown baseline(s) {bad}; choose from {list(BASELINES)} or 'none'")
    if cfg.noise.strip().lower() != "file":
        try:
            parse_noise_spec(cfg.noise)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"--noise {cfg.noise!r}: {exc}") from None
    elif not cfg.label_file:
        raise UsageError("--noise file needs --label-file PATH")
    if cfg.label_file and not os.path.isfile(cfg.label_file):
        raise UsageError(f"--label-file {cfg.label_file}: no such file")
    for sec in cfg.overrides:
        if sec not in OVERRIDE_SECTIONS:
            raise UsageError(f"override section {sec!r} is not one of {list(OVERRIDE_SECTIONS)}")
    unknown = sorted(set(cfg.overrides.get("baseline", {})) - set(BASELINE_DEFAULTS))
    if unknown:
        raise UsageError(f"unknown baseline option(s) {unknown}; known: {sorted(BASELINE_DEFAULTS)}")
    unknown = sorted(set(cfg.overrides.get("data", {})) - {"train_per_class", "test_limit"})
    if unknown:
        raise UsageError(f"unknown data option(s) {unknown}; known: ['test_limit', 'train_per_class']")


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_run_dir(rd: _RunDir, cfg: RunConfig, argv: Optional[Sequence[str]]) -> bool:
    """Writes run.json for a new directory; for an existing one checks the config. Returns True when
    resuming."""
    path = rd.path("run.json")
    ident = cfg.identity()
    # rank 0's view for every rank: a rank looking later could see the run.json rank 0 writes below
    listing = [f for f in os.listdir(rd.out) if not f.startswith(".")] if os.path.isdir(rd.out) else []
    exists, listing = dd.broadcast_object((os.path.exists(path), listing))
    if exists:
        try:
            prev = load_json(path)
        except ValueError as exc:
            raise UsageError(f"{path} is corrupt ({exc}); use another --out") from None
        old = prev.get("identity", {})
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
def _load_data(cfg: RunConfig):
    from .data import DatasetNotFoundError, load_dataset

    try:
        train = load_dataset(cfg.dataset, "train", root=cfg.data_root)
        test = load_dataset(cfg.dataset, "test", root=cfg.data_root)
    except DatasetNotFoundError as exc:
        raise UsageError(str(exc)) from None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    opts = cfg.overrides.get("data", {})
    per_class = opts.get("train_per_class")
    if per_class:
        # a deterministic, stratified slice (by the clean labels) -- for tests and quick looks
        g = torch.Generator().manual_seed(12345)
        idx = []
        for c in range(train.num_classes):
            ic = (train.labels == c).nonzero().flatten()
            idx.append(ic[torch.randperm(ic.numel(), generator=g)[: int(per_class)]])
        train = train.subset(torch.cat(idx).sort().values)
    limit = opts.get("test_limit")
    if limit:
        g = torch.Generator().manual_seed(54321)
        test = test.subset(torch.randperm(len(test), generator=g)[: int(limit)].sort().values)
    return train, test


def _read_label_file(path: str, n: int) -> torch.Tensor:
    import numpy as np

    try:
        if path.endswith(".npy"):
            arr = torch.as_tensor(np.load(path, allow_pickle=False))
        elif path.endswith(".safetensors"):
            from .io import load_safetensors

            t = load_safetensors(path)
            key = "labels" if "labels" in t else (next(iter(t)) if len(t) == 1 else None)
            if key is None:
                raise ValueError(f"holds {sorted(t)}; expected one tensor or 'labels'")
            arr = t[key]
        elif path.endswith((".pt", ".pth")):
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, dict):
                obj = obj.get("labels", obj.get("noisy_labels"))
            arr = torch.as_tensor(obj)
        else:
            arr = torch.as_tensor(np.loadtxt(path, dtype=np.int64, delimiter=None if not path.endswith(".csv") else ","))
    except (OSError, ValueError, RuntimeError, TypeError) as exc:
        raise UsageError(f"--label-file {path}: cannot read labels ({exc})") from None
    arr = arr.reshape(-1)
    if arr.is_floating_point() or arr.numel() != n:
        raise UsageError(f"--label-file {path}: expected {n} integer labels, got {arr.numel()} {arr.dtype}")
    return arr.long()


def _make_noise(cfg: RunConfig, train):
    from .noise import NoisyLabels, corrupt_labels, transition_matrix

    C = train.num_classes
    spec = cfg.noise.strip()
    try:
        if spec.lower() == "file":
            noisy = _read_label_file(cfg.label_file, len(train))
            if int(noisy.min()) < 0 or int(noisy.max()) >= C:
                raise UsageError(f"--label-file {cfg.label_file}: labels outside [0, {C})")
            mask = noisy == train.labels
            return NoisyLabels(labels=noisy, clean_mask=mask, transition=transition_matrix(train.labels, noisy, C),
                               spec=f"file:{os.path.basename(cfg.label_file)}",
                               rate=float((~mask).double().mean()), clean_labels=train.labels)
        human = None
        if spec.lower().startswith("human:") and cfg.label_file:
            from .data import load_human_labels

            human = load_human_labels(C, spec.split(":", 1)[1], path=cfg.label_file)
        mapping = None
        if spec.lower().startswith("asym"):
            from .noise import ASYM_MAPPINGS

            key = str(train.name).lower()
            mapping = key if key in ASYM_MAPPINGS else None
        return corrupt_labels(train.labels, spec, C, seed=cfg.effective_noise_seed, images=train.images,
                              mapping=mapping, human_root=cfg.data_root, human_labels=human)
    except FileNotFoundError as exc:
        raise UsageError(f"--noise {spec}: {exc}") from None
    except (ValueError, TypeError) as exc:
        if isinstance(exc, UsageError):
            raise
        raise UsageError(f"--noise {spec}: {exc}") from None


def _noise_facts(noisy, seed: int) -> Dict[str, Any]:
    T = noisy.transition.double()
    C = T.shape[0]
    diag = torch.diagonal(T)
    off = T.clone()
    off.fill_diagonal_(-1.0)
    flat = int(off.argmax())
    facts = {
        "spec": noisy.spec,
        "seed": int(seed),
        "n": int(noisy.labels.numel()),
        "n_flipped": int((~noisy.clean_mask).sum()),
        "realised_rate": float(noisy.rate),
        "transition": [[round(float(v), 6) for v in row] for row in T.tolist()],
        "transition_summary": {
            "diag_mean": float(diag.mean()), "diag_min": float(diag.min()), "diag_min_class": int(diag.argmin()),
            "offdiag_max": float(off.max()), "offdiag_max_pair": [flat // C, flat % C],
        },
        "labels_digest": _tensor_digest(noisy.labels),
    }
    try:
        from .noise import parse_noise_spec

        facts["target_rate"] = float(parse_noise_spec(noisy.spec).rate)
    except (ValueError, TypeError):
        facts["target_rate"] = None
    if getattr(noisy, "target_transition", None) is not None:
        facts["transition_summary"]["target_max_abs_diff"] = float((T - noisy.target_transition.double()).abs().max())
    return facts


# ----------------------------------------------------------------------------------------------------------
# evaluation helpers
# ----------------------------------------------------------------------------------------------------------
def synset_eval_config(syn, device: torch.device, runs: Optional[int], seed: int,
                       overrides: Optional[Dict[str, Any]] = None):
    """The :class:`~ddfast.evaluate.EvalConfig` of a synthetic set's protocol (``syn.eval_config``; the
    learned lr when the protocol does not fix one), with ``overrides`` applied."""
    from .evaluate import EvalConfig

    names = {f.name for f in dataclasses.fields(EvalConfig)}
    ec = {k: v for k, v in dict(syn.eval_config or {}).items() if k in names}
    if "lr" not in ec and syn.lr is not None:
        ec["lr"] = float(syn.lr)
    ec["device"] = str(device)
    ec.setdefault("num_classes", int(syn.num_classes))
    ec.setdefault("seed", int(seed))
    if runs is not None:
        ec["num_runs"] = int(runs)
    ov = dict(overrides or {})
    ov.pop("progress_epochs", None)  # the pipeline's own eval option (evaluation during distillation)
    bad = sorted(set(ov) - names)
    if bad:
        raise UsageError(f"unknown eval option(s) {bad}; known: {sorted(names)}")
    ec.update(ov)
    try:
        return EvalConfig(**ec).validate()
    except (TypeError, ValueError) as exc:
        raise UsageError(f"evaluation config: {exc}") from None


def _evaluate(images, labels, test, cfg_eval, transform, images_transformed: bool, desc: str, quiet: bool,
              weights=None):
    """Evaluation with a progress bar (per run) on rank 0, sharded over ranks under torchrun."""
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg_eval.num_runs, desc=desc, unit="run", disable=quiet or not dd.is_main(), leave=False,
               dynamic_ncols=True)
    res = dd.evaluate_sharded(images, labels, test, config=cfg_eval, transform=transform,
                              images_transformed=images_transformed, weights=weights,
                              log=lambda s: bar.update(1))
    bar.close()
    return res


def _result_dict(res, **extra) -> Dict[str, Any]:
    d = {"mean": float(res.mean), "std": float(res.std), "accs": [float(a) for a in res.accs],
         "seconds": float(res.seconds), "eval": res.config}
    d.update(extra)
    return d


# ----------------------------------------------------------------------------------------------------------
# distillation (+ TAD)
# ----------------------------------------------------------------------------------------------------------
def _progress_callback(cfg: RunConfig, dcfg, test, device: torch.device):
    """With ``eval_every > 0`` in the distiller's config: every ``eval_every`` iterations the current synthetic
    set is evaluated (the method's protocol, 1 run, at most ``eval.progress_epochs`` epochs, default 100) and
    ``test_acc`` is added to that iteration's history entry (checkpointed with it; plotted as accuracy over
    iterations)."""
    every = int(getattr(dcfg, "eval_every", 0) or 0)
    if every <= 0:
        return None
    from .evaluate import evaluate_synset
    from .report import synset_input_transform

    ov = dict(cfg.overrides.get("eval", {}))
    cap = int(ov.pop("progress_epochs", 100))

    def callback(distiller, metrics):
        if distiller.iteration % every:
            return
        syn = distiller.synthetic_set()
        ec = synset_eval_config(syn, device, 1, cfg.seed, ov)
        ec = ec.replace(epochs=max(1, min(ec.epochs, cap)))
        r = evaluate_synset(syn.images, syn.labels, test, config=ec, transform=synset_input_transform(syn),
                            images_transformed=True)
        metrics["test_acc"] = float(r.mean)

    return callback


def _configs(cfg: RunConfig, train):
    """The distiller's config and TAD's config (None without --tad), checked before anything is written.

    Raises:
        UsageError: an unknown or bad ``distill.*`` / ``tad.*`` / ``eval.*`` override, a preset without values
            for this dataset/IPC.
    """
    from .distill import make_config
    from .evaluate import EvalConfig

    ov = dict(cfg.overrides.get("distill", {}))
    ov.setdefault("seed", int(cfg.seed))
    try:
        dcfg = make_config(cfg.method, cfg.preset, train.name, cfg.ipc, **ov)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{cfg.method} config: {exc}") from None
    tad_cfg = None
    if cfg.tad:
        from . import tad as tad_mod

        kw = dict(cfg.overrides.get("tad", {}))
        kw.setdefault("seed", int(cfg.seed))
        try:
            tad_cfg = tad_mod.TADConfig().replace(**kw)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"TAD config: {exc}") from None
    elif cfg.overrides.get("tad"):
        raise UsageError("tad.* overrides given without --tad")
    names = {f.name for f in dataclasses.fields(EvalConfig)} | {"progress_epochs"}
    bad = sorted(set(cfg.overrides.get("eval", {})) - names)
    if bad:
        raise UsageError(f"unknown eval option(s) {bad}; known: {sorted(names)}")
    return dcfg, tad_cfg


def _distill(cfg: RunConfig, rd: _RunDir, train, noisy, device: torch.device, cache_dir: str, stages: _Stages,
             test=None, configs=None):
    from .distill import make_distiller
    from .distill.base import SyntheticSet, TrainSet

    dcfg, tad_cfg = configs if configs is not None else _configs(cfg, train)
    ts = TrainSet(images=train.images, labels=noisy.labels, num_classes=train.num_classes, mean=train.mean,
                  std=train.std, name=train.name)
    try:
        ts.check_ipc(cfg.ipc)
    except ValueError as exc:
        raise UsageError(f"--ipc {cfg.ipc}: {exc}") from None
    distiller = make_distiller(cfg.method, dcfg, device=device, cache_dir=os.path.join(cache_dir, "distill"),
                               quiet=cfg.quiet or not dd.is_main())
    ckpt_dir = rd.ckpt_dir
    os.makedirs(ckpt_dir, exist_ok=True)
    callback = _progress_callback(cfg, dcfg, test, device) if test is not None else None
    tad_info: Dict[str, Any] = {"enabled": bool(cfg.tad), "rounds": []}
    t0 = time.perf_counter()
    if cfg.tad:
        from . import tad as tad_mod

        result = tad_mod.run_tad(distiller, ts, config=tad_cfg, clean_labels=noisy,
                                 checkpoint_dir=ckpt_dir, resume=True, quiet=cfg.quiet or not dd.is_main(),
                                 callback=callback)
        tad_info["config"] = tad_cfg.to_dict()
        syn, rounds, summary = _unpack_tad(result)
        tad_info["rounds"] = rounds
        if summary:
            tad_info["summary"] = summary
    else:
        syn = distiller.run(ts, checkpoint_dir=ckpt_dir, resume=True, callback=callback)
    seconds = time.perf_counter() - t0
    if not isinstance(syn, SyntheticSet):
        raise TypeError(f"{cfg.method}: the distiller returned {type(syn).__name__}, not a SyntheticSet")
    sub = {f"distill.{k}": dict(v) for k, v in distiller.timer.stages.items()}
    history = list(getattr(distiller, "history", []))
    facts = {"config": dcfg.to_dict(), "iterations": int(distiller.iteration), "seconds": seconds,
             "peak_memory_bytes": _peak_memory(device), "substages": sub, "history": history, "tad": tad_info,
             "n_images": int(syn.images.shape[0]), "label_kind": "soft" if syn.soft else "hard"}
    return syn, facts


def _unpack_tad(result) -> Tuple[Any, List[Dict[str, Any]], Dict[str, Any]]:
    """Accepts what ``run_tad`` returns: an object/dict with ``synset``/``synthetic_set`` and ``rounds``
    (dicts or objects with ``to_dict``), or a ``(synset, rounds)`` tuple."""
    def as_dict(r):
        if isinstance(r, dict):
            return dict(r)
        if hasattr(r, "to_dict"):
            return dict(r.to_dict())
        if dataclasses.is_dataclass(r):
            return dataclasses.asdict(r)
        return {"value": str(r)}

    summary: Dict[str, Any] = {}
    if isinstance(result, tuple):
        syn, rounds = result[0], result[1]
    elif isinstance(result, dict):
        syn = result.get("synset", result.get("synthetic_set"))
        rounds = result.get("rounds", [])
        summary = dict(result.get("summary", {}) or {})
    else:
        syn = getattr(result, "synset", None) or getattr(result, "synthetic_set", None)
        rounds = getattr(result, "rounds", [])
        s = getattr(result, "summary", None)
        summary = dict(s() if callable(s) else (s or {}))
    rounds = [as_dict(r) for r in rounds]
    clean = []
    for i, r in enumerate(rounds):
        r.setdefault("round", i)
        clean.append({k: _jsonable(v) for k, v in r.items()})
    return syn, clean, {k: _jsonable(v) for k, v in summary.items()}


def _jsonable(v):
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if hasattr(v, "item"):
        return v.item()
    return str(v)


# ----------------------------------------------------------------------------------------------------------
# baselines
# ----------------------------------------------------------------------------------------------------------
def _random_subset_config(eval_cfg, syn, opts: Dict[str, Any]):
    """The random-subset baseline's EvalConfig: the method's protocol, with ``random_lr`` in place of a learned
    lr (DATM's learned lr belongs to the synthetic set, not to real images)."""
    return eval_cfg.replace(lr=float(opts["random_lr"])) if syn.lr is not None else eval_cfg


def _baseline_options(cfg: RunConfig) -> Dict[str, Any]:
    b = dict(BASELINE_DEFAULTS)
    b.update(cfg.overrides.get("baseline", {}))
    return b


def full_baseline_config(opts: Dict[str, Any], device, num_classes: int, seed: int):
    """The :class:`~ddfast.evaluate.EvalConfig` of the full-data baselines from the baseline options
    (:data:`BASELINE_DEFAULTS` + ``baseline.*`` overrides): ConvNet-3 of ``width``, SGD momentum 0.9, weight
    decay 5e-4, cosine decay per step, no DSA, ``epochs`` epochs, ``num_runs`` runs."""
    from .evaluate import EvalConfig

    return EvalConfig(model="convnet", model_kwargs={"width": int(opts["width"])}, lr=float(opts["lr"]),
                      epochs=int(opts["epochs"]), num_runs=int(opts["num_runs"]), batch_size=int(opts["batch_size"]),
                      schedule="cosine", dsa=False, vmap=False, device=str(device), num_classes=int(num_classes),
                      seed=int(seed))


def _run_baseline(name: str, cfg: RunConfig, train, test, noisy, syn, eval_cfg, transform, device,
                  quiet: bool) -> Dict[str, Any]:
    """One baseline's result dict (mean/std/accs in %, seconds, description), computed with
    :mod:`ddfast.baselines`' definitions; runs are sharded over ranks under torchrun and show progress.
    ``eval_cfg`` is the configuration the random subset trains with (:func:`_random_subset_config`)."""
    from tqdm.auto import tqdm

    from . import baselines as bl
    from .augment import Normalize
    from .evaluate import EvalConfig, EvalResult

    opts = _baseline_options(cfg)
    show = not quiet and dd.is_main()
    if name == "random_subset":
        # the method's protocol on ipc random real images per noisy class (a new subset per run: the spread
        # includes the draw); eval_cfg is already _random_subset_config's (random_lr for a learned lr)
        rcfg = eval_cfg
        t0 = time.perf_counter()
        bar = tqdm(total=rcfg.num_runs, desc="baseline random subset", unit="run", disable=not show, leave=False,
                   dynamic_ncols=True)
        mine: Dict[int, Any] = {}
        for k in dd.shard_indices(rcfg.num_runs):
            # run k of bl.random_subset: subset seed seed + k, network seed config.seed + k
            r = bl.random_subset(train, noisy, test, cfg.ipc, config=rcfg.replace(num_runs=1, seed=rcfg.seed + k),
                                 transform=transform, seed=int(cfg.seed) + k)
            mine[k] = (r.accs[0], r.config)
            bar.update(1)
        bar.close()
        got = dd.gather_by_index(rcfg.num_runs, mine)
        info = dict(got[0][1])
        info["num_runs"] = rcfg.num_runs
        shares = [g[1].get("subset_clean_share") for g in got if g[1].get("subset_clean_share") is not None]
        if shares:
            info["subset_clean_share"] = sum(shares) / len(shares)
        res = EvalResult.from_accs([g[0] for g in got], max(dd.all_gather_object(time.perf_counter() - t0)), info)
        share = f", {100 * info['subset_clean_share']:.0f} % of their labels correct" if shares else ""
        return _result_dict(res, n_images=int(cfg.ipc * train.num_classes),
                            description=f"{cfg.ipc} random real images per "
                                        f"{'class' if str(noisy.spec) == 'none' else 'noisy class'}{share}; the method's "
                                        f"protocol, lr {rcfg.lr:g}")
    if name not in ("full_noisy", "full_clean", "noisy_learner"):
        raise UsageError(f"unknown baseline {name!r}")
    # full-data baselines: bl.full_noisy / bl.full_clean / bl.gce are evaluate_synset on the whole training
    # set (labels, loss); the same runs go through evaluate_sharded here for per-epoch progress and sharding
    # (identical results: tests/test_pipeline.py checks it against ddfast.baselines)
    full_cfg = full_baseline_config(opts, device, train.num_classes, cfg.seed)
    labels = train.labels if name == "full_clean" else noisy.labels
    if name == "noisy_learner":
        if opts["learner"] != "gce":
            raise UsageError(f"baseline.learner {opts['learner']!r}: only 'gce' (ddfast.baselines.gce) is available")
        full_cfg = full_cfg.replace(loss="gce", gce_q=float(opts["gce_q"]))
    norm = Normalize(train.mean, train.std)
    steps = full_cfg.epochs * len(dd.shard_indices(full_cfg.num_runs))
    bar = tqdm(total=steps, desc=f"baseline {name}", unit="epoch", disable=not show, leave=False, dynamic_ncols=True)
    res = dd.evaluate_sharded(train.images, labels, test, config=full_cfg, transform=norm,
                              epoch_callback=lambda run, epoch: bar.update(1))
    bar.close()
    res.config.update({"baseline": {"full_noisy": "full_noisy", "full_clean": "full_clean",
                                    "noisy_learner": "gce"}[name], "noise": noisy.spec,
                       "noise_rate": 0.0 if name == "full_clean" else float(noisy.rate)})
    what = {"full_noisy": "noisy labels, cross entropy", "full_clean": "clean labels (oracle), cross entropy",
            "noisy_learner": f"noisy labels, GCE loss (q={opts['gce_q']})"}[name]
    return _result_dict(res, n_images=len(train), description=(
        f"all images, {what}; ConvNet width {opts['width']}, {opts['epochs']} epochs, lr {opts['lr']:g}"))


def _baseline_cache_key(name: str, cfg: RunConfig, train, noise_facts, eval_cfg, transform_kind: str) -> Dict[str, Any]:
    """What a cached baseline result depends on. ``eval_cfg`` is the configuration the baseline itself trains
    with (for the random subset: :func:`_random_subset_config`, so a learned lr that the baseline does not use
    does not split the cache)."""
    key = {"baseline": name, "dataset": train.name, "n_train": len(train), "noise": noise_facts["spec"],
           "noise_seed": noise_facts["seed"], "labels": noise_facts["labels_digest"],
           "data": cfg.overrides.get("data", {}), "seed": int(cfg.seed), "ddfast": __version__}
    if name == "random_subset":
        key.update({"ipc": cfg.ipc, "eval": {k: v for k, v in eval_cfg.to_dict().items() if k != "device"},
                    "transform": transform_kind, "random_lr": _baseline_options(cfg)["random_lr"]})
    else:
        key["options"] = {k: v for k, v in _baseline_options(cfg).items() if k != "random_lr"}
        if name != "noisy_learner":
            key["options"].pop("learner", None)
            key["options"].pop("gce_q", None)
    return key


# ----------------------------------------------------------------------------------------------------------
# environment
# ----------------------------------------------------------------------------------------------------------
def environment_info(device: Optional[torch.device] = None) -> Dict[str, Any]:
    """Versions, device, extension build info (``ddfast info`` and metrics.json)."""
    import torchvision

    from ._extension import build_info

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


# ----------------------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------------------
def run(cfg: RunConfig, argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Runs (or resumes, or just returns the metrics of a finished) ``cfg``; returns the metrics dict that
    is also written to ``cfg.out/metrics.json``.

    Raises:
        UsageError: bad arguments (unknown method/preset/dataset, bad noise spec or rate, missing label
            file, IPC larger than a class, another run's directory).
        RunConfigMismatch: ``cfg.out`` holds a run with other options.
    """
    t_start = time.perf_counter()
    load_start = _loadavg()
    _validate(cfg)
    device = resolve_device(cfg.device)
    dd.init_from_env(device)
    rd = _RunDir(cfg.out)
    stages = _Stages(device)

    # ---- data + noise (before the run directory is touched: bad arguments leave nothing behind) --------
    train, test = stages.run("data", lambda: _load_data(cfg))
    noisy = stages.run("noise", lambda: _make_noise(cfg, train))
    counts = torch.bincount(noisy.labels, minlength=train.num_classes)
    if int(counts.min()) < cfg.ipc:
        c = int(counts.argmin())
        raise UsageError(f"--ipc {cfg.ipc} is larger than class {c} ({int(counts[c])} samples with that label)")

    configs = _configs(cfg, train)
    resuming = _check_run_dir(rd, cfg, argv)
    cache_dir = os.path.abspath(os.path.expanduser(cfg.cache_dir or default_cache_dir()))
    if resuming and os.path.exists(rd.path("report.md")) and os.path.exists(rd.path("metrics.json")):
        m = load_json(rd.path("metrics.json"))
        if m.get("complete") and set(m.get("results", {})) >= {"distilled", *cfg.baselines}:
            _say(cfg, f"{rd.out}: finished run (report.md); nothing to do")
            return m
    prev_stages: Dict[str, Any] = rd.load("timing")["stages"] if rd.has("timing") else {}
    if resuming:
        _say(cfg, f"{rd.out}: resuming")
    _say(cfg, f"data: {train.name} train {len(train)} x {tuple(train.images.shape[1:])}, test {len(test)}")
    noise_facts = _noise_facts(noisy, cfg.effective_noise_seed)
    rd.save("noise", noise_facts)
    _say(cfg, f"noise: {noise_facts['spec']} realised rate {100 * noise_facts['realised_rate']:.2f} %")

    # ---- distill -------------------------------------------------------------------------------------
    from .distill.base import SyntheticSet

    synset_done = rd.has("distill") and os.path.exists(rd.path(SyntheticSet.FILE_META))
    if synset_done:
        syn = SyntheticSet.load(rd.out)
        dfacts = rd.load("distill")
        stages.record("distill", prev_stages.get("distill", {"seconds": dfacts.get("seconds")}))
        stages.stages["distill"]["resumed"] = True
        _say(cfg, f"distill: done earlier ({rd.path(SyntheticSet.FILE_TENSORS)})")
    else:
        _say(cfg, f"distill: {cfg.method}{' + TAD' if cfg.tad else ''} ({cfg.preset}) IPC {cfg.ipc} on {device}")
        syn, dfacts = stages.run("distill", lambda: _distill(cfg, rd, train, noisy, device, cache_dir, stages,
                                                                    test, configs))
        syn.metadata = dict(syn.metadata or {})
        syn.metadata["ddfast_run"] = {"dataset": train.name, "data_root": cfg.data_root,
                                      "data": cfg.overrides.get("data", {}), "noise": noise_facts["spec"],
                                      "noise_seed": noise_facts["seed"], "realised_rate": noise_facts["realised_rate"],
                                      "method": cfg.method, "tad": cfg.tad, "preset": cfg.preset, "seed": cfg.seed,
                                      "command": cfg.command()}
        if dd.is_main():
            syn.save(rd.out)
        rd.save("distill", dfacts)
        rd.save("timing", {"stages": {**prev_stages, **stages.stages}})
    for k, v in dfacts.get("substages", {}).items():
        stages.stages.setdefault(k, v)

    # ---- evaluate ------------------------------------------------------------------------------------
    from .report import synset_input_transform

    transform = synset_input_transform(syn)
    eval_cfg = synset_eval_config(syn, device, cfg.eval_runs, cfg.seed, cfg.overrides.get("eval"))
    if rd.has("evaluate"):
        distilled = rd.load("evaluate")
        stages.record("evaluate", prev_stages.get("evaluate", {"seconds": distilled.get("seconds")}))
        stages.stages["evaluate"]["resumed"] = True
    else:
        _say(cfg, f"evaluate: {eval_cfg.num_runs} x {eval_cfg.model}, {eval_cfg.epochs} epochs")
        res = stages.run("evaluate", lambda: _evaluate(syn.images, syn.labels, test, eval_cfg, transform, True,
                                                       "eval distilled", cfg.quiet))
        distilled = _result_dict(res, n_images=int(syn.images.shape[0]), label_kind="soft" if syn.soft else "hard",
                                 description=f"{cfg.method}{' + TAD' if cfg.tad else ''}, "
                                             f"{'soft' if syn.soft else 'hard'} labels"
                                             + (f", learned lr {float(syn.lr):.4g}" if syn.lr is not None else ""))
        rd.save("evaluate", distilled)
        rd.save("timing", {"stages": {**prev_stages, **stages.stages}})
    _say(cfg, f"distilled: {distilled['mean']:.2f} +- {distilled['std']:.2f} %")

    # ---- baselines -----------------------------------------------------------------------------------
    results: Dict[str, Any] = {"distilled": distilled}
    transform_kind = getattr(transform, "kind", type(transform).__name__)
    for name in cfg.baselines:
        sname = f"baseline:{name}"
        if rd.has(sname):
            results[name] = rd.load(sname)
            stages.record(sname, prev_stages.get(sname, {"seconds": results[name].get("seconds")}))
            stages.stages[sname]["resumed"] = True
            continue
        base_cfg = _random_subset_config(eval_cfg, syn, _baseline_options(cfg)) if name == "random_subset" else eval_cfg
        key = _baseline_cache_key(name, cfg, train, noise_facts, base_cfg, transform_kind)
        cpath = os.path.join(cache_dir, "baselines", f"{name}-{_digest(key)}.json")
        if os.path.exists(cpath):
            try:
                r = load_json(cpath)
                if r.get("key") == json.loads(json.dumps(key, default=str)):
                    results[name] = r["result"]
                    stages.record(sname, {"seconds": 0.0, "peak_memory_bytes": _peak_memory(device), "cached": True,
                                          "original_seconds": r["result"].get("seconds")})
                    rd.save(sname, results[name])
                    _say(cfg, f"{name}: cached {results[name]['mean']:.2f} % ({cpath})")
                    continue
            except (ValueError, KeyError):
                pass
        _say(cfg, f"baseline {name} ...")
        r = stages.run(sname, lambda: _run_baseline(name, cfg, train, test, noisy, syn, base_cfg, transform,
                                                   device, cfg.quiet))
        results[name] = r
        rd.save(sname, r)
        rd.save("timing", {"stages": {**prev_stages, **stages.stages}})
        if dd.is_main():
            atomic_write_json({"key": key, "result": r}, cpath)
        _say(cfg, f"{name}: {r['mean']:.2f} +- {r['std']:.2f} %")
    rd.save("timing", {"stages": stages.stages})

    # ---- report --------------------------------------------------------------------------------------
    def _write_outputs():
        from .report import plot_curves, plot_tad_rounds, render_report, save_synset_grid

        files: Dict[str, Any] = {"out_dir": rd.out, "synset": [SyntheticSet.FILE_TENSORS, SyntheticSet.FILE_META]}
        if not dd.is_main():
            return files
        save_synset_grid(syn, rd.path("synset_grid.png"), max_per_class=max(cfg.ipc, 1))
        files["grid"] = "synset_grid.png"
        tad_rounds = dfacts.get("tad", {}).get("rounds", [])
        bounds = [int(r["end_iteration"]) for r in tad_rounds if isinstance(r.get("end_iteration"), (int, float))]
        plots = plot_curves(dfacts.get("history", []), rd.plots_dir, round_bounds=bounds[:-1])
        plots.update(plot_tad_rounds(tad_rounds, rd.plots_dir, n_train=len(train)))
        files["plots"] = {k: os.path.relpath(v, rd.out) for k, v in plots.items()}
        return files

    files = stages.run("report", _write_outputs)
    metrics = {
        "schema": METRICS_SCHEMA,
        "complete": True,
        "command": cfg.command(),
        "config": cfg.to_dict(),
        "dataset": {"name": train.name, "n_train": len(train), "n_test": len(test),
                    "num_classes": train.num_classes, "classes": list(train.classes),
                    "image_shape": list(train.images.shape[1:]), "source": getattr(train, "source", "")},
        "noise": {k: v for k, v in noise_facts.items()},
        "results": results,
        "tad": dfacts.get("tad", {"enabled": cfg.tad, "rounds": []}),
        "distill": {"method": cfg.method, "preset": cfg.preset, "config": dfacts.get("config"),
                    "iterations": dfacts.get("iterations"), "n_images": dfacts.get("n_images"),
                    "label_kind": dfacts.get("label_kind"), "lr": None if syn.lr is None else float(syn.lr),
                    "final_loss": _last(dfacts.get("history", []), "loss"),
                    "eval_config": eval_cfg.to_dict(), "cache_dir": os.path.join(cache_dir, "distill")},
        "baseline_options": _baseline_options(cfg),
        "stages": stages.stages,
        "total_seconds": time.perf_counter() - t_start,
        "resumed": bool(resuming),
        "environment": {**environment_info(device), "load_average_start": load_start,
                        "load_average_end": _loadavg()},
        "files": files,
    }
    if dd.is_main():
        atomic_write_json(metrics, rd.path("metrics.json"))
        atomic_write_text(render_report_safe(metrics), rd.path("report.md"))
    dd.barrier()
    _say(cfg, f"wrote {rd.path('report.md')}")
    return metrics


def _loadavg() -> Optional[List[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def render_report_safe(metrics: Dict[str, Any]) -> str:
    from .report import render_report

    return render_report(metrics)


def _last(history: Sequence[Dict[str, Any]], key: str) -> Optional[float]:
    for h in reversed(history or []):
        v = h.get(key)
        if isinstance(v, (int, float)):
            return float(v)
    return None


# ----------------------------------------------------------------------------------------------------------
# ddfast evaluate DIR
# ----------------------------------------------------------------------------------------------------------
def evaluate_dir(directory: str, *, model: Optional[str] = None, runs: Optional[int] = None, device: str = "auto",
                 dataset: Optional[str] = None, data_root: Optional[str] = None,
                 overrides: Optional[Dict[str, Any]] = None, quiet: bool = False, write: bool = True) -> Dict[str, Any]:
    """Re-evaluates the synthetic set saved in ``directory`` with its protocol (``model`` replaces the
    network for a cross-architecture check, e.g. ``resnet18``). The test set is the one of the run
    (dataset and slicing from the set's metadata, or ``dataset``). Writes
    ``directory/evaluations/<model>-<runs>runs.json`` when ``write``. Returns the result dict.

    Raises:
        UsageError: no synthetic set in ``directory``; unknown model; dataset not found.
    """
    from .data import DatasetNotFoundError, load_dataset
    from .distill.base import SyntheticSet
    from .report import synset_input_transform

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
        g = torch.Generator().manual_seed(54321)
        test = test.subset(torch.randperm(len(test), generator=g)[: int(limit)].sort().values)
    ov = dict(overrides or {})
    if model:
        from .models import MODEL_NAMES

        if model.lower() not in MODEL_NAMES:
            raise UsageError(f"unknown model {model!r}; choose one of {list(MODEL_NAMES)}")
        ov["model"] = model
        if model.lower() != str((syn.eval_config or {}).get("model", "convnet")).lower():
            ov.setdefault("model_kwargs", {})
    ec = synset_eval_config(syn, dev, runs, int(meta.get("seed", 0)), ov)
    transform = synset_input_transform(syn)
    res = _evaluate(syn.images, syn.labels, test, ec, transform, True, f"eval {ec.model}", quiet)
    out = _result_dict(res, n_images=int(syn.images.shape[0]), model=ec.model, dataset=name)
    if write and dd.is_main():
        atomic_write_json(out, os.path.join(directory, "evaluations", f"{ec.model}-{ec.num_runs}runs.json"))
    return out
