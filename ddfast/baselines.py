"""Baselines on the evaluation harness, to compare distilled sets with (noisy-labels.md §1):

- :func:`full_clean` -- the oracle: the whole training set with its clean labels;
- :func:`full_noisy` -- the whole training set with the noisy labels (the only baseline of DD_LNL);
- :func:`random_subset` -- ``ipc`` random real images per (noisy) class with their noisy labels, the
  "random real" row of every distillation table, at the distilled set's size;
- :func:`gce` -- an established noisy-label learner: the whole noisy set trained with the Generalized Cross
  Entropy loss ``L_q(p, y) = (1 - p_y^q) / q`` (Zhang & Sabuncu, "Generalized Cross Entropy Loss for Training
  Deep Neural Networks with Noisy Labels", NeurIPS 2018, eq. 6; ``q = 0.7`` as recommended there).

Why GCE (and not Co-teaching or DivideMix): GCE changes only the loss, so it runs on exactly the same
harness, network, optimiser, schedule and cost as :func:`full_noisy`, and the comparison isolates the effect
of a noise-robust objective; it needs no estimate of the noise rate (Co-teaching, Han et al. NeurIPS 2018,
sets its forget rate to the true rate -- an oracle the distillers do not get) and no second network
(Co-teaching, 2x cost) nor semi-supervised MixMatch stages with GMM sample selection (DivideMix, Li et al.
ICLR 2020, 2 networks and many more hyper-parameters), which on this 2-core CPU would cost several times the
other baselines. GCE interpolates between CE (q -> 0) and the noise-tolerant MAE (q = 1) and is among the
standard baselines of noisy-label papers. Known limitation: like MAE it helps most for symmetric noise;
structured (asymmetric) flips are harder for it.

Every function returns an :class:`ddfast.evaluate.EvalResult` whose ``config`` also records the baseline's
name, the noise spec, the realised noise rate of the labels used and, for subsets, the share of clean labels.
"""
from __future__ import annotations

import time
from typing import Any, Dict, Optional, Union

import torch

from .evaluate import EvalConfig, EvalResult, evaluate_synset

__all__ = ["full_clean", "full_noisy", "random_subset", "gce", "select_random_subset", "BASELINES"]

BASELINES = ("full_clean", "full_noisy", "random_subset", "gce")


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


def full_clean(train, test, *, config: Optional[EvalConfig] = None, transform=None, **overrides) -> EvalResult:
    """Oracle: trains on every training image with its clean label. ``train``/``test``: ImageDataset;
    ``config``/``overrides``/``transform`` as in :func:`ddfast.evaluate.evaluate_synset`."""
    res = evaluate_synset(train.images, train.labels, test, config=config, transform=transform,
                          num_classes=train.num_classes, **overrides)
    return _annotate(res, baseline="full_clean", noise="none", noise_rate=0.0)


def full_noisy(train, noisy_labels, test, *, config: Optional[EvalConfig] = None, transform=None,
               **overrides) -> EvalResult:
    """Trains on every training image with its noisy label (cross entropy). ``noisy_labels``:
    :class:`ddfast.noise.NoisyLabels` or ``int64 [N]``."""
    labels, spec, rate, _ = _labels_of(noisy_labels)
    _check_train(train, labels)
    res = evaluate_synset(train.images, labels, test, config=config, transform=transform,
                          num_classes=train.num_classes, **overrides)
    return _annotate(res, baseline="full_noisy", noise=spec, noise_rate=rate)


def gce(train, noisy_labels, test, *, q: float = 0.7, config: Optional[EvalConfig] = None, transform=None,
        **overrides) -> EvalResult:
    """The noisy-label learner: the whole noisy set with the GCE loss (module docstring), ``q`` in (0, 1]."""
    labels, spec, rate, _ = _labels_of(noisy_labels)
    _check_train(train, labels)
    res = evaluate_synset(train.images, labels, test, config=config, transform=transform,
                          num_classes=train.num_classes, loss="gce", gce_q=q, **overrides)
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
                  seed: int = 0, **overrides) -> EvalResult:
    """``ipc`` random real images per noisy class with their noisy labels (same size as a distilled set).

    Run k (of ``num_runs``) draws its own subset with seed ``seed + k`` and trains one network on it with
    ``config.seed + k``, so the spread includes the choice of the subset. ``config`` records the mean
    share of clean labels in the subsets (when the clean mask is known).
    """
    labels, spec, rate, clean = _labels_of(noisy_labels)
    _check_train(train, labels)
    cfg = (config or EvalConfig()).replace(**overrides).validate()
    t0 = time.perf_counter()
    accs, clean_share = [], []
    last = None
    for k in range(cfg.num_runs):
        idx = select_random_subset(labels, ipc, train.num_classes, seed=seed + k)
        if clean is not None:
            clean_share.append(float(clean[idx].double().mean()))
        last = evaluate_synset(train.images[idx], labels[idx], test, config=cfg, transform=transform,
                               num_classes=train.num_classes, num_runs=1, seed=cfg.seed + k)
        accs.append(last.accs[0])
    res = EvalResult.from_accs(accs, time.perf_counter() - t0, {**last.config, "num_runs": cfg.num_runs})
    info: Dict[str, Any] = {"baseline": "random_subset", "ipc": ipc, "subset_seed": seed, "noise": spec,
                            "noise_rate": rate}
    if clean_share:
        info["subset_clean_share"] = sum(clean_share) / len(clean_share)
    return _annotate(res, **info)
