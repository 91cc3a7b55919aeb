"""Baselines on the evaluation harness, to compare distilled sets with. One name per baseline:

- ``full_clean`` -- the oracle: the whole training set with its clean labels;
- ``full_noisy`` -- the whole training set with the noisy labels (the only baseline of DD_LNL, Cheng et al.,
  arXiv 2411.11924);
- ``random_subset`` -- ``ipc`` random real images per (noisy) class with their noisy labels, the "random real"
  row of every distillation table, at the distilled set's size, trained with the distilled set's protocol;
- ``gce`` -- an established noisy-label learner: the whole noisy set trained with the Generalized Cross
  Entropy loss ``L_q(p, y) = (1 - p_y^q) / q`` (Zhang & Sabuncu, "Generalized Cross Entropy Loss for Training
  Deep Neural Networks with Noisy Labels", NeurIPS 2018, eq. 6; ``q = 0.7`` as recommended there).

:func:`run_baseline` runs any of them by name (what ``ddfast run`` calls); :func:`full_clean`,
:func:`full_noisy`, :func:`gce` and :func:`random_subset` are the same baselines as functions. The full-data
baselines train the network and budget of :class:`BaselineConfig`; their runs are spread over the ranks
under ``torchrun`` (:func:`ddfast.evaluate.evaluate_sharded`).

Why GCE: it changes only the loss, so it runs on exactly the same harness, network, optimiser, schedule and
cost as ``full_noisy``, and the comparison isolates the effect of a noise-robust objective; it needs no
estimate of the noise rate. GCE interpolates between CE (q -> 0) and the noise-tolerant MAE (q = 1) and is
among the standard baselines of noisy-label papers. Known limitation: like MAE it helps most for symmetric
noise; structured (asymmetric) flips are harder for it.

Every function returns an :class:`ddfast.evaluate.EvalResult` whose ``config`` also records the baseline's
name, the noise spec, the realised noise rate of the labels used and, for subsets, the share of clean labels.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import torch

from . import distributed as dd
from .augment import Normalize
from .config import Config, option
from .evaluate import EvalConfig, EvalResult, evaluate_sharded, evaluate_synset

__all__ = ["BASELINES", "DEFAULT_BASELINES", "BaselineConfig", "run_baseline", "describe_baseline", "full_clean",
           "full_noisy", "random_subset", "gce", "select_random_subset"]

#: every baseline ``ddfast run --baselines`` accepts
BASELINES = ("full_noisy", "random_subset", "gce", "full_clean")
#: the baselines of a run unless the user chooses (the clean oracle needs clean labels)
DEFAULT_BASELINES = ("full_noisy", "random_subset", "gce")


@dataclass
class BaselineConfig(Config):
    """The budget of the full-data baselines (``-O baseline.KEY=VALUE``).

    Attributes:
        epochs: epochs of the full-data baselines (full noisy / clean / GCE). Default 3.
        width: ConvNet-3 width of the full-data baselines. Default 32.
        num_runs: runs of the full-data baselines. Default 1.
        batch_size, lr: SGD (momentum 0.9, weight decay 5e-4, cosine decay per step, no augmentation).
            Defaults 128 and 0.02.
        gce_q: GCE's ``q`` in (0, 1]. Default 0.7.
        random_lr: learning rate of the random subset when the distilled set's protocol uses a learned lr
            (DATM's lr belongs to the synthetic set, not to real images). Default 0.01.
    """

    epochs: int = option(3, ge=1)
    width: int = option(32, ge=1)
    num_runs: int = option(1, ge=1)
    batch_size: int = option(128, ge=1)
    lr: float = option(0.02, gt=0)
    gce_q: float = option(0.7, gt=0, le=1)
    random_lr: float = option(0.01, gt=0)

    def full_eval_config(self, device="cpu", num_classes: Optional[int] = None, seed: int = 0) -> EvalConfig:
        """The :class:`EvalConfig` of the full-data baselines: ConvNet-3 of ``width``, SGD momentum 0.9,
        weight decay 5e-4, cosine decay per step, no DSA, ``epochs`` epochs, ``num_runs`` runs."""
        return EvalConfig(model="convnet", model_kwargs={"width": int(self.width)}, lr=float(self.lr),
                          epochs=int(self.epochs), num_runs=int(self.num_runs), batch_size=int(self.batch_size),
                          schedule="cosine", dsa=False, vmap=False, device=str(device), num_classes=num_classes,
                          seed=int(seed))

    def subset_eval_config(self, protocol: EvalConfig, learned_lr: bool) -> EvalConfig:
        """The random subset's :class:`EvalConfig`: the distilled set's ``protocol``, with ``random_lr`` in
        place of a learned lr."""
        return protocol.replace(lr=float(self.random_lr)) if learned_lr else protocol


def _labels_of(noisy) -> tuple:
    """(labels int64 [N], spec str, realised rate or None, clean mask or None) from NoisyLabels or a tensor."""
    if hasattr(noisy, "labels") and hasattr(noisy, "clean_mask"):
        return noisy.labels, getattr(noisy, "spec", "?"), float(noisy.rate), noisy.clean_mask
    t = torch.as_tensor(noisy)
    if t.dim() != 1 or t.is_floating_point():
        raise ValueError("noisy_labels must be a NoisyLabels or an int64 tensor [N]")
    return t.long(), "unknown", None, None


def _check_train(train, labels):
    if not (hasattr(train, "images") and hasattr(train, "labels")):
        raise TypeError("train must be an ImageDataset")
    if labels.shape != train.labels.shape:
        raise ValueError(f"noisy_labels has {labels.numel()} entries, train has {len(train.labels)}")


def _annotate(res: EvalResult, **info: Any) -> EvalResult:
    res.config = {**res.config, **info}
    return res


def _full(name: str, train, labels, test, config: Optional[EvalConfig], transform, epoch_callback, overrides):
    cfg = (config if config is not None else EvalConfig()).replace(**overrides)
    if name == "gce":
        cfg = cfg.replace(loss="gce")
    num_classes = cfg.num_classes if cfg.num_classes is not None else train.num_classes
    return evaluate_sharded(train.images, labels, test, config=cfg.replace(num_classes=num_classes),
                            transform=transform, epoch_callback=epoch_callback)


def full_clean(train, test, *, config: Optional[EvalConfig] = None, transform=None, epoch_callback=None,
               **overrides) -> EvalResult:
    """Oracle: trains on every training image with its clean label. ``train``/``test``: ImageDataset;
    ``config``/``overrides``/``transform`` as in :func:`ddfast.evaluate.evaluate_synset`;
    ``epoch_callback(run, epoch)`` after every epoch (progress)."""
    res = _full("full_clean", train, train.labels, test, config, transform, epoch_callback, overrides)
    return _annotate(res, baseline="full_clean", noise="none", noise_rate=0.0)


def full_noisy(train, noisy_labels, test, *, config: Optional[EvalConfig] = None, transform=None,
               epoch_callback=None, **overrides) -> EvalResult:
    """Trains on every training image with its noisy label (cross entropy). ``noisy_labels``:
    :class:`ddfast.noise.NoisyLabels` or ``int64 [N]``."""
    labels, spec, rate, _ = _labels_of(noisy_labels)
    _check_train(train, labels)
    res = _full("full_noisy", train, labels, test, config, transform, epoch_callback, overrides)
    return _annotate(res, baseline="full_noisy", noise=spec, noise_rate=rate)


def gce(train, noisy_labels, test, *, q: float = 0.7, config: Optional[EvalConfig] = None, transform=None,
        epoch_callback=None, **overrides) -> EvalResult:
    """The noisy-label learner: the whole noisy set with the GCE loss (module docstring), ``q`` in (0, 1]."""
    labels, spec, rate, _ = _labels_of(noisy_labels)
    _check_train(train, labels)
    res = _full("gce", train, labels, test, config, transform, epoch_callback, dict(overrides, gce_q=q))
    return _annotate(res, baseline="gce", noise=spec, noise_rate=rate)


def select_random_subset(labels: torch.Tensor, ipc: int, num_classes: int, seed: int = 0) -> torch.Tensor:
    """``int64 [num_classes * ipc]`` indices: ``ipc`` distinct samples drawn uniformly per class of ``labels``
    (the labels the learner sees, i.e. the noisy ones), class by class in order; seeded.

    Raises:
        ValueError: ``ipc < 1`` or a class with fewer than ``ipc`` samples.
    """
    if isinstance(ipc, bool) or not isinstance(ipc, int) or ipc < 1:
        raise ValueError(f"ipc must be a positive int, got {ipc!r}")
    g = torch.Generator()
    g.manual_seed(int(seed))
    out = []
    for c in range(num_classes):
        idx = (labels == c).nonzero().flatten()
        if idx.numel() < ipc:
            raise ValueError(f"ipc={ipc}: class {c} has only {idx.numel()} samples")
        out.append(idx[torch.randperm(idx.numel(), generator=g)[:ipc]])
    return torch.cat(out)


def random_subset(train, noisy_labels, test, ipc: int, *, config: Optional[EvalConfig] = None, transform=None,
                  seed: int = 0, run_callback: Optional[Callable[[int], None]] = None, **overrides) -> EvalResult:
    """``ipc`` random real images per noisy class with their noisy labels (same size as a distilled set).

    Run k (of ``num_runs``) draws its own subset with seed ``seed + k`` and trains one network on it with
    ``config.seed + k``, so the spread includes the choice of the subset. Under ``torchrun`` the runs are
    spread over the ranks (the results are those of the single-process loop). ``config`` records the mean
    share of clean labels in the subsets (when the clean mask is known). ``run_callback(k)`` after each run
    (progress).
    """
    labels, spec, rate, clean = _labels_of(noisy_labels)
    _check_train(train, labels)
    cfg = (config or EvalConfig()).replace(**overrides).validate()
    t0 = time.perf_counter()
    mine: Dict[int, Any] = {}
    for k in dd.shard_indices(cfg.num_runs):
        idx = select_random_subset(labels, ipc, train.num_classes, seed=seed + k)
        share = float(clean[idx].double().mean()) if clean is not None else None
        r = evaluate_synset(train.images[idx], labels[idx], test, config=cfg, transform=transform,
                            num_classes=train.num_classes, num_runs=1, seed=cfg.seed + k)
        mine[k] = (r.accs[0], r.config, share)
        if run_callback is not None:
            run_callback(k)
    got = dd.gather_by_index(cfg.num_runs, mine)
    res = EvalResult.from_accs([g[0] for g in got], max(dd.all_gather_object(time.perf_counter() - t0)),
                               {**got[0][1], "num_runs": cfg.num_runs})
    info: Dict[str, Any] = {"baseline": "random_subset", "ipc": ipc, "subset_seed": seed, "noise": spec,
                            "noise_rate": rate}
    shares = [g[2] for g in got if g[2] is not None]
    if shares:
        info["subset_clean_share"] = sum(shares) / len(shares)
    return _annotate(res, **info)


def describe_baseline(name: str, config: BaselineConfig, result: EvalResult, *, ipc: Optional[int] = None,
                      noise_spec: str = "") -> str:
    """One line saying what a baseline row trained (for reports)."""
    if name == "random_subset":
        share = result.config.get("subset_clean_share")
        share = f", {100 * share:.0f} % of their labels correct" if share is not None else ""
        return (f"{ipc} random real images per {'class' if noise_spec == 'none' else 'noisy class'}{share}; the "
                f"method's protocol, lr {float(result.config.get('lr', 0.0)):g}")
    what = {"full_noisy": "noisy labels, cross entropy", "full_clean": "clean labels (oracle), cross entropy",
            "gce": f"noisy labels, GCE loss (q={config.gce_q})"}[name]
    return f"all images, {what}; ConvNet width {config.width}, {config.epochs} epochs, lr {config.lr:g}"


def run_baseline(name: str, train, noisy, test, *, config: BaselineConfig, ipc: int, subset_config: EvalConfig,
                 transform=None, device="cpu", seed: int = 0,
                 progress: Optional[Callable[[], None]] = None) -> EvalResult:
    """Runs the baseline ``name`` (:data:`BASELINES`) and returns its :class:`EvalResult`.

    Args:
        train, test: the training and test :class:`ddfast.data.ImageDataset`; noisy: the
            :class:`ddfast.noise.NoisyLabels` of ``train``.
        config: the full-data budget; ipc / subset_config: the random subset's size and protocol
            (:meth:`BaselineConfig.subset_eval_config`); transform: the random subset's input transform (the
            distilled set's; the full-data baselines normalise with the dataset's mean/std).
        seed: base seed of the networks and the subset draws.
        progress: called after every epoch (full-data) or run (subset).

    Raises:
        ValueError: an unknown name.
    """
    tick = (lambda *a: progress()) if progress is not None else None
    if name == "random_subset":
        return random_subset(train, noisy, test, ipc, config=subset_config, transform=transform, seed=int(seed),
                             run_callback=tick)
    full_cfg = config.full_eval_config(device, train.num_classes, seed)
    norm = Normalize(train.mean, train.std)
    if name == "full_clean":
        return full_clean(train, test, config=full_cfg, transform=norm, epoch_callback=tick)
    if name == "full_noisy":
        return full_noisy(train, noisy, test, config=full_cfg, transform=norm, epoch_callback=tick)
    if name == "gce":
        return gce(train, noisy, test, q=config.gce_q, config=full_cfg, transform=norm, epoch_callback=tick)
    raise ValueError(f"unknown baseline {name!r}; choose from {list(BASELINES)}")
