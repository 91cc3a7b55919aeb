"""What one ``ddfast run`` is: :class:`RunConfig`, its typed overrides, and :func:`resolve`, which checks all of
it before any work starts."""
from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from .. import distributed as dd
from ..baselines import BASELINES, DEFAULT_BASELINES, BaselineConfig
from ..config import Config, UnknownOptionError, option
from ..distill import METHODS, PRESETS, make_config
from ..distill.base import DistillConfig
from ..evaluate import EvalConfig
from ..noise import parse_noise_spec
from ..tad import TADConfig

__all__ = ["RunConfig", "RunConfigMismatch", "UsageError", "DataOptions", "ResolvedRun", "resolve",
           "parse_overrides", "resolve_device", "default_cache_dir", "DEMO", "DEMO_OVERRIDES", "OVERRIDE_SECTIONS"]

OVERRIDE_SECTIONS = ("distill", "tad", "eval", "baseline", "data")


class UsageError(ValueError):
    """A bad argument of a run (unknown dataset/method/preset, bad rate or IPC, missing file...)."""


class RunConfigMismatch(UsageError):
    """The output directory holds a run with another configuration."""


@dataclass
class DataOptions(Config):
    """``-O data.KEY=VALUE``: a deterministic, stratified slice of the data (tests and quick looks).

    Attributes:
        train_per_class: keep this many training images per (clean) class; None = all.
        test_limit: keep this many test images (a seeded random subset); None = all.
    """

    train_per_class: Optional[int] = option(None, ge=1)
    test_limit: Optional[int] = option(None, ge=1)


@dataclass
class RunConfig(Config):
    """One ``ddfast run``.

    Attributes:
        dataset: a :func:`ddfast.data.load_dataset` name (or a user file).
        noise: a :func:`ddfast.noise.parse_noise_spec` spec (``sym:0.4``, ``asym:0.4``, ``idn:0.2``,
            ``human:worse``, ``none``) or ``file`` with ``label_file``.
        method: ``datm`` | ``dance`` | ``rcig`` (any name in ``ddfast.distill.METHODS``).
        tad: wrap the distiller in TAD (:func:`ddfast.tad.run_tad`).
        ipc: images per class of the distilled set (and of the random-subset baseline).
        preset: ``quick`` | ``full`` (the distiller's preset).
        seed: seed of the distiller, the evaluation runs, the subset draw and the baselines.
        noise_seed: seed of the label corruption (default: ``seed``).
        imbalance: a long-tailed training set: ratio n_min / n_max in (0, 1] of an exponential class profile
            (:func:`ddfast.data.long_tailed_indices`, the CIFAR-10-LT protocol of Cao et al., NeurIPS 2019), drawn
            with ``seed`` from the clean labels before the noise; the test set stays balanced. None: all images.
        label_file: noisy labels from a file: with ``noise="human:KEY"`` a CIFAR-N ``*_human.pt``; with
            ``noise="file"`` a ``.pt``/``.npy``/``.safetensors``/``.txt`` holding one label per training image.
        out: the run directory.
        device: ``cpu`` | ``cuda`` | ``auto``.
        eval_runs: number of evaluation runs of the distilled set and the random subset (default: the
            method's protocol).
        baselines: which baselines to run (:data:`ddfast.baselines.BASELINES`).
        data_root: extra folder searched for the dataset files.
        cache_dir: default ``$DDFAST_CACHE`` or ``~/.cache/ddfast``.
        overrides: ``{"distill"|"tad"|"eval"|"baseline"|"data": {key: value}}`` -- the distiller's config
            (dotted keys reach nested options: ``"expert.epochs"``), :class:`ddfast.tad.TADConfig`,
            :class:`ddfast.evaluate.EvalConfig` fields of the distilled-set evaluation (and ``progress_epochs``),
            :class:`ddfast.baselines.BaselineConfig`, :class:`DataOptions`. Checked by :func:`resolve`.
        privacy: run the privacy audit (:func:`ddfast.privacy.audit`: nearest training images and membership
            inference, with the ``full_noisy`` baseline's network as reference) and add its section to the
            report.
        quiet: no progress bars, only errors.
    """

    dataset: str = option("fashion-mnist")
    noise: str = option("sym:0.4")
    method: str = option("datm")
    tad: bool = option(True)
    ipc: int = option(10)
    preset: str = option("quick")
    seed: int = option(0)
    noise_seed: Optional[int] = option(None)
    imbalance: Optional[float] = option(None, gt=0, le=1)
    label_file: Optional[str] = option(None)
    out: str = option(os.path.join("runs", "demo"))
    device: str = option("auto")
    eval_runs: Optional[int] = option(None)
    baselines: Tuple[str, ...] = option(DEFAULT_BASELINES)
    data_root: Optional[str] = option(None)
    cache_dir: Optional[str] = option(None)
    overrides: Dict[str, Dict[str, Any]] = option(factory=dict)
    privacy: bool = option(True)
    quiet: bool = option(False)

    # fields that do not change the result (a resumed run may differ in them)
    _NON_IDENTITY = ("out", "device", "cache_dir", "quiet", "data_root", "baselines", "privacy")

    def identity(self) -> Dict[str, Any]:
        """The fields a resumed run must share with the run that started the directory."""
        d = self.to_dict()
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
        d = super().to_dict()
        d["baselines"] = list(self.baselines)
        return d

    def command(self) -> str:
        """The equivalent ``ddfast run`` command line."""
        import json

        parts = ["ddfast", "run", "--dataset", self.dataset, "--noise", self.noise, "--method", self.method]
        if self.tad:
            parts.append("--tad")
        parts += ["--ipc", str(self.ipc), "--preset", self.preset, "--seed", str(self.seed), "--out", self.out]
        for flag, value in (("--noise-seed", self.noise_seed), ("--imbalance", self.imbalance),
                            ("--label-file", self.label_file),
                            ("--eval-runs", self.eval_runs), ("--data-root", self.data_root)):
            if value is not None:
                parts += [flag, str(value)]
        if self.device != "auto":
            parts += ["--device", self.device]
        if tuple(self.baselines) != DEFAULT_BASELINES:
            parts += ["--baselines", ",".join(self.baselines) or "none"]
        if not self.privacy:
            parts.append("--no-privacy")
        for sec, kv in sorted(self.overrides.items()):
            for k, v in sorted(kv.items()):
                parts += ["--override", f"{sec}.{k}={json.dumps(v) if not isinstance(v, str) else v}"]
        return " ".join(shlex.quote(p) for p in parts)


#: the demo: ``ddfast run`` with no arguments (see README "Quick start"); its overrides (none today). Its
#: baselines leave out Co-teaching, which trains two networks (twice the time of a full-data baseline on
#: Fashion-MNIST); ``--baselines full_noisy,random_subset,gce,coteaching`` adds it.
DEMO_OVERRIDES: Dict[str, Dict[str, Any]] = {}
DEMO = RunConfig(baselines=("full_noisy", "random_subset", "gce"))


def parse_overrides(items: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """``["distill.iterations=20", "eval.epochs=5", "lr_img=100", "distill.expert.epochs=6"]`` ->
    ``{"distill": {"iterations": 20, "lr_img": 100, "expert.epochs": 6}, "eval": {"epochs": 5}}``.
    Values are parsed as YAML scalars/lists (``20`` -> int, ``0.1`` -> float, ``true``, ``[1, 2]``); their types
    are checked against the configs by :func:`resolve`. A key without a section goes to ``distill``.

    Raises:
        UsageError: an item without ``=`` or an unknown section.
    """
    import yaml

    out: Dict[str, Dict[str, Any]] = {}
    for item in items or ():
        if "=" not in item:
            raise UsageError(f"--override {item!r}: expected KEY=VALUE (e.g. distill.iterations=20)")
        key, _, raw = item.partition("=")
        sec, dot, name = key.strip().partition(".")
        if not dot:
            sec, name = "distill", key.strip()
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
# resolution: every setting checked before any work
# ----------------------------------------------------------------------------------------------------------
@dataclass
class ResolvedRun:
    """A :class:`RunConfig` with every override turned into a validated, typed config."""

    cfg: RunConfig
    distill: DistillConfig
    tad: Optional[TADConfig]
    eval_overrides: Dict[str, Any]
    progress_epochs: int
    baseline: BaselineConfig
    data: DataOptions
    device: torch.device
    cache_dir: str = field(default="")


def _section_error(section: str, exc: Exception, cls_name: Optional[str] = None) -> UsageError:
    """``-O <section>.<key>: <what is wrong>`` from a config error whose message starts with the class name."""
    if isinstance(exc, UnknownOptionError):
        inner = exc.path.split(".", 1)[1] + "." if "." in exc.path else ""
        names = ", ".join(f"{section}.{inner}{n}" for n in exc.names)
        return UsageError(f"-O {names}: unknown {section} option{'s' if len(exc.names) > 1 else ''}; known: "
                          f"{exc.known}")
    msg = " ".join(str(exc).split())
    if cls_name and msg.startswith(cls_name):
        msg = section + msg[len(cls_name):]
    elif not msg.startswith(section):
        msg = f"{section}: {msg}"
    return UsageError(f"-O {msg}")


def _check_basics(cfg: RunConfig) -> None:
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
        hint = " ('noisy_learner' is now 'gce')" if "noisy_learner" in bad else ""
        raise UsageError(f"unknown baseline(s) {bad}; choose from {list(BASELINES)} or 'none'{hint}")
    if cfg.noise.strip().lower() != "file":
        try:
            parse_noise_spec(cfg.noise)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"--noise {cfg.noise!r}: {exc}") from None
    elif not cfg.label_file:
        raise UsageError("--noise file needs --label-file PATH")
    if cfg.label_file and not os.path.isfile(cfg.label_file):
        raise UsageError(f"--label-file {cfg.label_file}: no such file")
    for sec, kv in cfg.overrides.items():
        if sec not in OVERRIDE_SECTIONS:
            raise UsageError(f"override section {sec!r} is not one of {list(OVERRIDE_SECTIONS)}")
        if not isinstance(kv, dict):
            raise UsageError(f"-O {sec}: expected KEY=VALUE settings, got {kv!r}")


def _resolve_distill(cfg: RunConfig, dataset: str):
    ov = dict(cfg.overrides.get("distill", {}))
    ov.setdefault("seed", int(cfg.seed))
    try:
        return make_config(cfg.method, cfg.preset, dataset, cfg.ipc, **ov)
    except (TypeError, ValueError) as exc:
        m = re.match(r"[A-Z]\w*Config", str(exc))
        raise _section_error("distill", exc, m.group(0) if m else None) from None


def _resolve_tad(cfg: RunConfig):
    if not cfg.tad:
        if cfg.overrides.get("tad"):
            raise UsageError("tad.* overrides given without --tad")
        return None
    kw = dict(cfg.overrides.get("tad", {}))
    kw.setdefault("seed", int(cfg.seed))
    try:
        return TADConfig().replace(**kw)
    except (TypeError, ValueError) as exc:
        raise _section_error("tad", exc, "TADConfig") from None


def _resolve_eval(cfg: RunConfig) -> Tuple[Dict[str, Any], int]:
    ov = dict(cfg.overrides.get("eval", {}))
    progress = ov.pop("progress_epochs", 100)
    if isinstance(progress, bool) or not isinstance(progress, int) or progress < 1:
        raise UsageError(f"-O eval.progress_epochs: must be an int >= 1, got {progress!r}")
    try:
        EvalConfig().replace(**ov)  # every value checked now, not after distillation
    except (TypeError, ValueError) as exc:
        raise _section_error("eval", exc, "EvalConfig") from None
    return ov, int(progress)


def _resolve_section(cfg: RunConfig, section: str, cls):
    try:
        return cls.from_dict(cfg.overrides.get(section, {}), path=section)
    except (TypeError, ValueError) as exc:
        raise _section_error(section, exc) from None


def resolve(cfg: RunConfig, dataset_name: Optional[str] = None) -> ResolvedRun:
    """Checks every setting of ``cfg`` and turns the overrides into typed configs (before anything is read or
    written). ``dataset_name``: the loaded dataset's name (presets depend on it; default ``cfg.dataset``).

    Raises:
        UsageError: naming the option for anything the user can fix (unknown names, wrong types, out-of-range
            values, settings that contradict each other).
    """
    _check_basics(cfg)
    device = resolve_device(cfg.device)
    eval_ov, progress = _resolve_eval(cfg)
    distill = _resolve_distill(cfg, dataset_name or cfg.dataset)
    try:  # settings the device cannot run (a CUDA-only option on a CPU), before anything is written
        distill.check_device(device)
    except ValueError as exc:
        m = re.match(r"[A-Z]\w*Config", str(exc))
        raise _section_error("distill", exc, m.group(0) if m else None) from None
    return ResolvedRun(cfg=cfg, distill=distill, tad=_resolve_tad(cfg),
                       eval_overrides=eval_ov, progress_epochs=progress,
                       baseline=_resolve_section(cfg, "baseline", BaselineConfig),
                       data=_resolve_section(cfg, "data", DataOptions), device=device,
                       cache_dir=os.path.abspath(os.path.expanduser(cfg.cache_dir or default_cache_dir())))
