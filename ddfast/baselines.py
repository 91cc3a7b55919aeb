"""Baselines on the evaluation harness, to compare distilled sets with. One name per baseline:

- ``full_noisy`` -- the whole training set with the noisy labels, trained to convergence (the baseline of DD_LNL,
  Cheng et al., arXiv 2411.11924, and of the noisy-label literature);
- ``random_subset`` -- ``ipc`` random real images per (noisy) class with their noisy labels, the "random real"
  row of every distillation table, at the distilled set's size, trained with the distilled set's protocol;
- ``gce`` -- an established noisy-label learner: the whole noisy set trained with the Generalized Cross
  Entropy loss ``L_q(p, y) = (1 - p_y^q) / q`` (Zhang & Sabuncu, "Generalized Cross Entropy Loss for Training
  Deep Neural Networks with Noisy Labels", NeurIPS 2018, eq. 6; ``q = 0.7`` as recommended there);
- ``coteaching`` -- a second one: Co-teaching (Han et al., "Co-teaching: Robust Training of Deep Neural Networks
  with Extremely Noisy Labels", NeurIPS 2018, Algorithm 1): two networks, each trained on the ``1 - R(T)`` share
  of every mini-batch that its peer finds small-loss, ``R(T) = tau min(T / T_k, 1)`` (``T_k = 10``). The forget
  rate ``tau`` is the noise rate, which a user does not know: here it is estimated from the noisy labels alone
  after the first (warm-up, ``R = 0``) epoch, as one minus the mean posterior of the low-loss component of a
  per-class two-component Gaussian mixture on the first network's training losses (the DivideMix-style loss
  GMM, Li et al., ICLR 2020, :func:`ddfast.ops.classwise_gmm`); ``BaselineConfig.coteaching_forget`` fixes it
  instead (e.g. the true rate: the oracle setting, marked as such in reports);
- ``full_clean`` -- the oracle: the whole training set with its clean labels.

**Protocol of the full-data baselines** (:class:`BaselineConfig`): ConvNet-3, SGD with momentum 0.9, weight
decay 5e-4 and a cosine-decaying learning rate, ``epochs`` epochs (default 30: to convergence; the clean oracle
reaches about 92-93 % on Fashion-MNIST), no augmentation. A seeded ``holdout`` share (default 10 %) of the training
set is held out with its *noisy* labels and the networks train on the rest; after every epoch the test accuracy and
the held-out (noisy-label) accuracy are recorded. Each result reports

- the **last-epoch** test accuracy -- the headline: what a user without clean labels gets (``accs``, ``mean``);
- the **best-epoch** test accuracy -- an oracle, it peeks at the clean test labels (``config["best_epoch"]``);
- the test accuracy at the epoch of the best **held-out noisy-label** accuracy -- early stopping a careful user
  can do without clean labels (``config["early_stop"]``);
- the per-epoch test and held-out curves (``config["curve"]``, ``config["holdout_curve"]``).

``epochs=3, holdout=0`` gives the earlier short protocol (a network trained that briefly has not memorised the
flipped labels yet; nobody can choose that stopping point without clean labels).

:func:`run_baseline` runs any of them by name (what ``ddfast run`` calls); :func:`full_clean`,
:func:`full_noisy`, :func:`gce`, :func:`coteaching` and :func:`random_subset` are the same baselines as functions.
Their runs are spread over the ranks under ``torchrun``.

Why GCE: it changes only the loss, so it runs on exactly the same harness, network, optimiser, schedule and
cost as ``full_noisy``, and the comparison isolates the effect of a noise-robust objective; it needs no
estimate of the noise rate. Known limitation: like MAE it helps most for symmetric noise; structured
(asymmetric) flips are harder for it. Co-teaching costs two networks (twice ``full_noisy``).

Every function returns an :class:`ddfast.evaluate.EvalResult` whose ``config`` also records the baseline's
name, the noise spec, the realised noise rate of the labels used and, for subsets, the share of clean labels.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from . import distributed as dd
from .augment import Normalize
from .config import Config, option
from .evaluate import (EvalConfig, EvalResult, evaluate_model, evaluate_synset, lr_factor, make_optimizer,
                       train_classifier)
from .models import get_model
from .ops import classwise_gmm

__all__ = ["BASELINES", "DEFAULT_BASELINES", "DECODED_SUBSET", "multi_formation", "BaselineConfig", "run_baseline", "describe_baseline", "full_clean",
           "full_noisy", "random_subset", "gce", "coteaching", "select_random_subset", "holdout_split",
           "estimate_noise_rate"]

#: every baseline ``ddfast run --baselines`` accepts
BASELINES = ("full_noisy", "random_subset", "gce", "coteaching", "full_clean")
#: run beside ``random_subset`` when the distilled set uses multi-formation (DANCE / IDC, ``factor > 1``)
DECODED_SUBSET = "random_subset_decoded"
#: the baselines of a run unless the user chooses (the clean oracle needs clean labels)
DEFAULT_BASELINES = ("full_noisy", "random_subset", "gce", "coteaching")


@dataclass
class BaselineConfig(Config):
    """The protocol of the full-data baselines (``-O baseline.KEY=VALUE``; module docstring).

    Attributes:
        epochs: epochs of the full-data baselines (full noisy / clean / GCE / Co-teaching). Default 30 (to
            convergence; 3 with ``holdout=0`` is the earlier short protocol).
        width: ConvNet-3 width of the full-data baselines. Default 32.
        num_runs: runs of the full-data baselines. Default 1.
        batch_size, lr: SGD (momentum 0.9, weight decay 5e-4, cosine decay per step, no augmentation).
            Defaults 128 and 0.02.
        holdout: share of the training set held out, with its noisy labels, for early stopping (seeded draw;
            0 disables early stopping and trains on everything). Default 0.1.
        gce_q: GCE's ``q`` in (0, 1]. Default 0.7.
        coteaching_forget: Co-teaching's forget rate ``tau``; None (default) estimates it from the noisy labels
            (module docstring). Setting the true noise rate gives the oracle setting.
        coteaching_tk: epochs over which the forget rate ramps up to ``tau`` (``T_k``; Han et al.: 10).
        random_lr: learning rate of the random subset when the distilled set's protocol uses a learned lr
            (DATM's lr belongs to the synthetic set, not to real images). Default 0.01.
    """

    epochs: int = option(30, ge=1)
    width: int = option(32, ge=1)
    num_runs: int = option(1, ge=1)
    batch_size: int = option(128, ge=1)
    lr: float = option(0.02, gt=0)
    holdout: float = option(0.1, ge=0, lt=1)
    gce_q: float = option(0.7, gt=0, le=1)
    coteaching_forget: Optional[float] = option(None, ge=0, lt=1)
    coteaching_tk: int = option(10, ge=1)
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


def holdout_split(n: int, share: float, seed: int = 0):
    """``(train_idx, holdout_idx)`` int64: a seeded random ``share`` of ``range(n)`` held out (``round(share n)``
    samples; none when ``share == 0``), both sorted."""
    if not 0 <= share < 1:
        raise ValueError(f"holdout share must be in [0, 1), got {share!r}")
    g = torch.Generator()
    g.manual_seed(int(seed) + 7919)
    perm = torch.randperm(n, generator=g)
    k = int(round(share * n))
    return perm[k:].sort().values, perm[:k].sort().values


@torch.no_grad()
def _accuracy_on(model: torch.nn.Module, X: torch.Tensor, Y: torch.Tensor, batch_size: int = 1024) -> float:
    was = model.training
    model.eval()
    correct = sum(int((model(X[i:i + batch_size]).argmax(1) == Y[i:i + batch_size]).sum())
                  for i in range(0, X.shape[0], batch_size))
    model.train(was)
    return 100.0 * correct / max(X.shape[0], 1)


def _summarise(curves: List[List[float]], holdouts: List[List[float]], seconds: float,
               config: Dict[str, Any], per_class: Optional[List[Optional[List[float]]]] = None) -> EvalResult:
    """The result of full-data runs from their per-epoch test (and held-out) curves: accs = last epoch; best
    epoch (oracle) and early stopping on the held-out noisy labels in ``config``; ``per_class``: each run's
    per-class accuracies at the last epoch."""
    def stats(vals):
        t = torch.tensor(vals, dtype=torch.float64)
        return {"mean": float(t.mean()), "std": float(t.std(unbiased=False)) if len(vals) > 1 else 0.0,
                "accs": [float(v) for v in vals]}
    best_ep = [max(range(len(c)), key=lambda e: c[e]) for c in curves]
    info: Dict[str, Any] = {
        "protocol": "last epoch", "epochs_trained": len(curves[0]),
        "best_epoch": {**stats([c[e] for c, e in zip(curves, best_ep)]), "epochs": [e + 1 for e in best_ep],
                       "note": "oracle: chosen with the clean test labels"},
        "curve": [sum(c[e] for c in curves) / len(curves) for e in range(len(curves[0]))]}
    if holdouts and holdouts[0]:
        es_ep = [max(range(len(h)), key=lambda e: h[e]) for h in holdouts]
        info["early_stop"] = {**stats([c[e] for c, e in zip(curves, es_ep)]), "epochs": [e + 1 for e in es_ep],
                              "note": "the epoch of the best accuracy on the held-out noisy labels"}
        info["holdout_curve"] = [sum(h[e] for h in holdouts) / len(holdouts) for e in range(len(holdouts[0]))]
    return EvalResult.from_accs([c[-1] for c in curves], seconds, {**config, **info}, per_class)


def _full(name: str, train, labels, test, config: Optional[EvalConfig], transform, epoch_callback, overrides,
          holdout: float = 0.0, keep_model: Optional[list] = None):
    """Trains ``num_runs`` networks on ``(train.images, labels)`` minus a held-out share, recording the test and
    held-out accuracy after every epoch (:func:`_summarise`). ``keep_model``: a list that gets run 0's trained
    network (on the process that trains run 0)."""
    cfg = (config if config is not None else EvalConfig()).replace(**overrides)
    if name == "gce":
        cfg = cfg.replace(loss="gce")
    num_classes = cfg.num_classes if cfg.num_classes is not None else train.num_classes
    cfg = cfg.replace(num_classes=num_classes).validate()
    t0 = time.perf_counter()
    tr_idx, ho_idx = holdout_split(len(labels), holdout, cfg.seed)
    dev = torch.device(cfg.device)
    Xh = train.images[ho_idx].to(dev, torch.float32)
    Xh = transform(Xh) if transform is not None else Xh
    Yh = labels[ho_idx].to(dev)
    mine: Dict[int, Any] = {}
    for k in dd.shard_indices(cfg.num_runs):
        curve: List[float] = []
        hcurve: List[float] = []
        last_pc: List[List[float]] = []

        def record(epoch, model, curve=curve, hcurve=hcurve, k=k, last_pc=last_pc):
            if epoch == 0:
                return
            last_pc.clear()  # keeps the latest epoch's per-class accuracies
            curve.append(evaluate_model(model, test, transform=transform, batch_size=cfg.eval_batch_size,
                                        per_class_into=last_pc))
            if ho_idx.numel():
                hcurve.append(_accuracy_on(model, Xh, Yh, cfg.eval_batch_size))
            if epoch_callback is not None:
                epoch_callback(k, epoch)
        net = train_classifier(train.images[tr_idx], labels[tr_idx], config=cfg, num_classes=num_classes,
                               transform=transform, run=k, callback=record)
        if keep_model is not None and k == 0:
            keep_model.append(net)
        mine[k] = (curve, hcurve, last_pc[0] if last_pc else None)
    got = dd.gather_by_index(cfg.num_runs, mine)
    seconds = max(dd.all_gather_object(time.perf_counter() - t0))
    info = {**cfg.to_dict(), "loss_resolved": cfg.loss or "ce", "n_train": int(tr_idx.numel()),
            "n_holdout": int(ho_idx.numel())}
    return _summarise([g[0] for g in got], [g[1] for g in got], seconds, info, [g[2] for g in got])


def full_clean(train, test, *, config: Optional[EvalConfig] = None, transform=None, epoch_callback=None,
               holdout: float = 0.0, **overrides) -> EvalResult:
    """Oracle: trains on every training image with its clean label. ``train``/``test``: ImageDataset;
    ``config``/``overrides``/``transform`` as in :func:`ddfast.evaluate.evaluate_synset`; ``holdout``: the
    held-out share (module docstring); ``epoch_callback(run, epoch)`` after every epoch (progress)."""
    res = _full("full_clean", train, train.labels, test, config, transform, epoch_callback, overrides, holdout)
    return _annotate(res, baseline="full_clean", noise="none", noise_rate=0.0)


def full_noisy(train, noisy_labels, test, *, config: Optional[EvalConfig] = None, transform=None,
               epoch_callback=None, holdout: float = 0.0, keep_model: Optional[list] = None,
               **overrides) -> EvalResult:
    """Trains on every training image with its noisy label (cross entropy). ``noisy_labels``:
    :class:`ddfast.noise.NoisyLabels` or ``int64 [N]``. Result: last-epoch accuracy, plus best-epoch (oracle),
    early stopping on the held-out noisy labels and the curves in ``config`` (module docstring).
    ``keep_model``: a list that gets the trained network of run 0 (e.g. the privacy audit's reference model)."""
    labels, spec, rate, _ = _labels_of(noisy_labels)
    _check_train(train, labels)
    res = _full("full_noisy", train, labels, test, config, transform, epoch_callback, overrides, holdout,
                keep_model)
    return _annotate(res, baseline="full_noisy", noise=spec, noise_rate=rate)


def gce(train, noisy_labels, test, *, q: float = 0.7, config: Optional[EvalConfig] = None, transform=None,
        epoch_callback=None, holdout: float = 0.0, **overrides) -> EvalResult:
    """The noisy-label learner: the whole noisy set with the GCE loss (module docstring), ``q`` in (0, 1]."""
    labels, spec, rate, _ = _labels_of(noisy_labels)
    _check_train(train, labels)
    res = _full("gce", train, labels, test, config, transform, epoch_callback, dict(overrides, gce_q=q), holdout)
    return _annotate(res, baseline="gce", noise=spec, noise_rate=rate)


# ---- Co-teaching ---------------------------------------------------------------------------------------
@torch.no_grad()
def _losses(model: torch.nn.Module, X: torch.Tensor, Y: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    was = model.training
    model.eval()
    out = torch.cat([F.cross_entropy(model(X[i:i + batch_size]), Y[i:i + batch_size], reduction="none")
                     for i in range(0, X.shape[0], batch_size)])
    model.train(was)
    return out


def estimate_noise_rate(losses: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """The share of noisy labels estimated from per-sample training losses alone: one minus the mean posterior of
    the low-loss component of a two-component Gaussian mixture fitted per class (:func:`ddfast.ops.classwise_gmm`;
    the DivideMix loss GMM). ``losses float [N]``, ``labels int64 [N]``; returns a rate in [0, 1]."""
    fit = classwise_gmm(losses.double().cpu(), labels.cpu(), num_classes)
    return float(min(1.0, max(0.0, 1.0 - float(fit.posterior_low.mean()))))


def _coteaching_run(X, Y, Xh, Yh, test, transform, cfg: EvalConfig, num_classes: int, forget: Optional[float],
                    tk: int, run: int, on_epoch) -> Dict[str, Any]:
    dev = X.device
    nets = [get_model(cfg.model, X.shape[1], num_classes, tuple(X.shape[2:]), seed=cfg.seed + run + 1000 * j,
                      **cfg.model_kwargs).to(dev).train() for j in range(2)]
    opts = [make_optimizer(cfg, m.parameters()) for m in nets]
    n, bs = X.shape[0], min(cfg.batch_size, X.shape[0])
    steps = math.ceil(n / bs)
    total = steps * cfg.epochs
    g = torch.Generator()
    g.manual_seed(int(cfg.seed) * 1000003 + run)
    tau = forget
    curve: List[float] = []
    hcurve: List[float] = []
    step = 0
    for epoch in range(cfg.epochs):
        rate = 0.0 if tau is None else tau * min(epoch / tk, 1.0)
        perm = torch.randperm(n, generator=g).to(dev)
        for b in range(steps):
            idx = perm[b * bs:(b + 1) * bs]
            xb, yb = X[idx], Y[idx]
            logits = [m(xb) for m in nets]
            keep = max(1, int(round((1.0 - rate) * idx.numel())))
            with torch.no_grad():
                small = [F.cross_entropy(lg, yb, reduction="none").argsort()[:keep] for lg in logits]
            f = lr_factor(cfg, epoch, step, total)
            for j in range(2):  # each network learns from the samples its peer finds small-loss
                sel = small[1 - j]
                loss = F.cross_entropy(logits[j][sel], yb[sel])
                for pg in opts[j].param_groups:
                    pg["lr"] = cfg.lr * f
                opts[j].zero_grad(set_to_none=True)
                loss.backward()
                opts[j].step()
            step += 1
        if tau is None:  # after the warm-up epoch: estimate the forget rate from the noisy labels alone
            tau = estimate_noise_rate(_losses(nets[0], X, Y, cfg.eval_batch_size), Y, num_classes)
        pc: List[List[float]] = []
        curve.append(evaluate_model(nets[0], test, transform=transform, batch_size=cfg.eval_batch_size,
                                    per_class_into=pc))
        if Xh.shape[0]:
            hcurve.append(_accuracy_on(nets[0], Xh, Yh, cfg.eval_batch_size))
        if on_epoch is not None:
            on_epoch(run, epoch + 1)
    return {"curve": curve, "holdout": hcurve, "forget_rate": float(tau), "per_class": pc[0] if curve else None}


def coteaching(train, noisy_labels, test, *, config: Optional[EvalConfig] = None, transform=None,
               forget_rate: Optional[float] = None, tk: int = 10, epoch_callback=None, holdout: float = 0.0,
               **overrides) -> EvalResult:
    """Co-teaching (module docstring) on the full-data protocol: two networks of ``config``'s model and recipe
    (cross entropy on the selected samples), forget rate ``forget_rate`` or, when None, estimated after the
    first epoch (:func:`estimate_noise_rate`), ramped over ``tk`` epochs. The first network is tested. The
    result's ``config`` records ``forget_rate`` (per run) and ``forget_rate_source`` (``"estimated"`` or
    ``"given"``)."""
    labels, spec, rate, _ = _labels_of(noisy_labels)
    _check_train(train, labels)
    cfg = (config if config is not None else EvalConfig()).replace(**overrides)
    num_classes = cfg.num_classes if cfg.num_classes is not None else train.num_classes
    cfg = cfg.replace(num_classes=num_classes).validate()
    t0 = time.perf_counter()
    tr_idx, ho_idx = holdout_split(len(labels), holdout, cfg.seed)
    dev = torch.device(cfg.device)
    with torch.no_grad():
        X = train.images[tr_idx].to(dev, torch.float32)
        Xh = train.images[ho_idx].to(dev, torch.float32)
        if transform is not None:
            X, Xh = transform(X), transform(Xh)
    Y, Yh = labels[tr_idx].to(dev), labels[ho_idx].to(dev)
    mine = {k: _coteaching_run(X, Y, Xh, Yh, test, transform, cfg, num_classes, forget_rate, int(tk), k,
                               epoch_callback) for k in dd.shard_indices(cfg.num_runs)}
    got = dd.gather_by_index(cfg.num_runs, mine)
    seconds = max(dd.all_gather_object(time.perf_counter() - t0))
    info = {**cfg.to_dict(), "loss_resolved": "ce", "n_train": int(tr_idx.numel()), "n_holdout": int(ho_idx.numel()),
            "forget_rate": [g["forget_rate"] for g in got], "forget_rate_tk": int(tk),
            "forget_rate_source": "estimated" if forget_rate is None else "given"}
    res = _summarise([g["curve"] for g in got], [g["holdout"] for g in got], seconds, info,
                     [g.get("per_class") for g in got])
    return _annotate(res, baseline="coteaching", noise=spec, noise_rate=rate)


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


def multi_formation(images: torch.Tensor, ipc: int, factor: int, num_classes: int) -> torch.Tensor:
    """Real images stored and decoded as a multi-formation synthetic set is (IDC, Kim et al., ICML 2022, §3.2; the
    equal-storage random baseline of its tables): per class, ``factor^2`` real images are resized into the tiles of
    one stored image (:func:`ddfast.distill.dance.mix_tiles`) and every stored image is decoded back into
    ``factor^2`` training images (:func:`ddfast.distill.dance.decode`).

    Args:
        images: ``float [num_classes * ipc * factor^2, C, H, W]``, class by class (as :func:`select_random_subset`
            returns them for ``ipc * factor^2``).

    Returns:
        ``float [num_classes * ipc * factor^2, C, H, W]``, class by class: what training sees.
    """
    from .distill.dance import decode, mix_tiles

    per = ipc * factor * factor
    if images.shape[0] != num_classes * per:
        raise ValueError(f"images must hold {num_classes} x {per} images, got {images.shape[0]}")
    with torch.no_grad():
        return torch.cat([decode(mix_tiles(images[c * per:(c + 1) * per], ipc, factor), factor)
                          for c in range(num_classes)])


def random_subset(train, noisy_labels, test, ipc: int, *, config: Optional[EvalConfig] = None, transform=None,
                  seed: int = 0, run_callback: Optional[Callable[[int], None]] = None, factor: int = 1,
                  **overrides) -> EvalResult:
    """``ipc`` random real images per noisy class with their noisy labels: the storage of a distilled set.

    Run k (of ``num_runs``) draws its own subset with seed ``seed + k`` and trains one network on it with
    ``config.seed + k``, so the spread includes the choice of the subset. Under ``torchrun`` the runs are
    spread over the ranks (the results are those of the single-process loop). ``config`` records the mean
    share of clean labels in the subsets (when the clean mask is known). ``run_callback(k)`` after each run
    (progress). With ``factor > 1`` each stored image holds ``factor^2`` random real images and training sees
    them decoded (:func:`multi_formation`): the same storage and decoding as a multi-formation distilled set.
    """
    labels, spec, rate, clean = _labels_of(noisy_labels)
    _check_train(train, labels)
    cfg = (config or EvalConfig()).replace(**overrides).validate()
    f = int(factor)
    if f < 1:
        raise ValueError(f"factor must be >= 1, got {factor!r}")
    t0 = time.perf_counter()
    mine: Dict[int, Any] = {}
    for k in dd.shard_indices(cfg.num_runs):
        idx = select_random_subset(labels, ipc * f * f, train.num_classes, seed=seed + k)
        share = float(clean[idx].double().mean()) if clean is not None else None
        images = train.images[idx] if f == 1 else multi_formation(train.images[idx], ipc, f, train.num_classes)
        r = evaluate_synset(images, labels[idx], test, config=cfg, transform=transform,
                            num_classes=train.num_classes, num_runs=1, seed=cfg.seed + k)
        mine[k] = (r.accs[0], r.config, share, r.per_class)
        if run_callback is not None:
            run_callback(k)
    got = dd.gather_by_index(cfg.num_runs, mine)
    res = EvalResult.from_accs([g[0] for g in got], max(dd.all_gather_object(time.perf_counter() - t0)),
                               {**got[0][1], "num_runs": cfg.num_runs}, [g[3] for g in got])
    info: Dict[str, Any] = {"baseline": "random_subset" if f == 1 else "random_subset_decoded", "ipc": ipc,
                            "factor": f, "n_stored": ipc * train.num_classes, "subset_seed": seed, "noise": spec,
                            "noise_rate": rate}
    shares = [g[2] for g in got if g[2] is not None]
    if shares:
        info["subset_clean_share"] = sum(shares) / len(shares)
    return _annotate(res, **info)


def reference_network(train, noisy_labels, *, config: BaselineConfig, device="cpu", seed: int = 0,
                      state: Optional[Dict[str, torch.Tensor]] = None):
    """Run 0 of the ``full_noisy`` baseline: ConvNet-3 of ``config.width`` trained on the noisy labels of every
    training image outside the held-out share, with the full-data protocol and input normalisation of
    :func:`run_baseline` -- the reference model of the privacy audit (:func:`ddfast.privacy.audit`).

    Args:
        train: the training :class:`ddfast.data.ImageDataset`; noisy_labels: its :class:`ddfast.noise.NoisyLabels`
            or ``int64 [N]``.
        state: a state dict saved from an earlier identical call (or the baseline's run 0); given, nothing is
            trained and the network is rebuilt from it.

    Returns:
        ``(model, transform, member_idx)``: the network (eval mode, on ``device``), its input transform (pixels in
        [0, 1] -> normalised) and the sorted ``int64`` indices of the images it was trained on.

    Raises:
        ValueError: labels of the wrong length; a ``state`` of another architecture (from ``load_state_dict``).
    """
    labels, _, _, _ = _labels_of(noisy_labels)
    _check_train(train, labels)
    cfg = config.full_eval_config(device, train.num_classes, seed).validate()
    tr_idx, _ = holdout_split(len(labels), float(config.holdout), cfg.seed)
    norm = Normalize(train.mean, train.std)
    if state is None:
        model = train_classifier(train.images[tr_idx], labels[tr_idx], config=cfg, num_classes=train.num_classes,
                                 transform=norm, run=0)
    else:
        model = get_model(cfg.model, train.in_channels, train.num_classes, tuple(train.images.shape[2:]),
                          seed=cfg.seed, **cfg.model_kwargs)
        model.load_state_dict(state)
        model = model.to(torch.device(cfg.device))
    return model.eval(), norm, tr_idx


def describe_baseline(name: str, config: BaselineConfig, result: EvalResult, *, ipc: Optional[int] = None,
                      noise_spec: str = "") -> str:
    """One line saying what a baseline row trained and which protocol it reports (for reports)."""
    if name in ("random_subset", DECODED_SUBSET):
        share = result.config.get("subset_clean_share")
        share = f", {100 * share:.0f} % of their labels correct" if share is not None else ""
        f = int(result.config.get("factor", 1))
        what = "class" if noise_spec == "none" else "noisy class"
        how = (f"{ipc} random real images per {what}" if f == 1 else
               f"{ipc} stored images per {what}, each {f * f} random real images decoded as the distilled set's")
        return f"{how}{share}; the method's protocol, lr {float(result.config.get('lr', 0.0)):g}"
    what = {"full_noisy": "noisy labels, cross entropy", "full_clean": "clean labels (oracle), cross entropy",
            "gce": f"noisy labels, GCE loss (q={config.gce_q})", "coteaching": "noisy labels, Co-teaching"}[name]
    if name == "coteaching":
        taus = result.config.get("forget_rate") or []
        how = "estimated from the noisy labels" if result.config.get("forget_rate_source") == "estimated" else "given"
        if taus:
            what += f" (forget rate {sum(taus) / len(taus):.2f}, {how})"
    n_hold = int(result.config.get("n_holdout", 0) or 0)
    hold = f", {n_hold} held out (noisy labels) for early stopping" if n_hold else ""
    return (f"all images{hold}; {what}; ConvNet width {config.width}, {config.epochs} epochs (cosine lr from "
            f"{config.lr:g}); last-epoch accuracy")


def run_baseline(name: str, train, noisy, test, *, config: BaselineConfig, ipc: int, subset_config: EvalConfig,
                 transform=None, device="cpu", seed: int = 0, factor: int = 1,
                 progress: Optional[Callable[[], None]] = None, keep_model: Optional[list] = None) -> EvalResult:
    """Runs the baseline ``name`` (:data:`BASELINES`) and returns its :class:`EvalResult`.

    Args:
        train, test: the training and test :class:`ddfast.data.ImageDataset`; noisy: the
            :class:`ddfast.noise.NoisyLabels` of ``train``.
        config: the full-data protocol; ipc / subset_config: the random subset's size and protocol
            (:meth:`BaselineConfig.subset_eval_config`); transform: the random subset's input transform (the
            distilled set's; the full-data baselines normalise with the dataset's mean/std).
        seed: base seed of the networks, the held-out split and the subset draws.
        factor: the distilled set's multi-formation factor (``random_subset_decoded``).
        progress: called after every epoch (full-data) or run (subset).
        keep_model: ``full_noisy`` only: a list that gets the trained network of run 0.

    Raises:
        ValueError: an unknown name.
    """
    tick = (lambda *a: progress()) if progress is not None else None
    if name in ("random_subset", DECODED_SUBSET):
        return random_subset(train, noisy, test, ipc, config=subset_config, transform=transform, seed=int(seed),
                             run_callback=tick, factor=int(factor) if name == DECODED_SUBSET else 1)
    full_cfg = config.full_eval_config(device, train.num_classes, seed)
    norm = Normalize(train.mean, train.std)
    kw = dict(config=full_cfg, transform=norm, epoch_callback=tick, holdout=float(config.holdout))
    if name == "full_clean":
        return full_clean(train, test, **kw)
    if name == "full_noisy":
        return full_noisy(train, noisy, test, keep_model=keep_model, **kw)
    if name == "gce":
        return gce(train, noisy, test, q=config.gce_q, **kw)
    if name == "coteaching":
        return coteaching(train, noisy, test, forget_rate=config.coteaching_forget, tk=config.coteaching_tk, **kw)
    raise ValueError(f"unknown baseline {name!r}; choose from {list(BASELINES)}")
