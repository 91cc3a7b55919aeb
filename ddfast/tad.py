"""Trust-aware diversion (TAD): a wrapper that turns a dataset distiller into a noise-robust one.

Source: Wu, Liu, Shen, Cao, Yu, "Trust-Aware Diversion for Data-Effective Distillation", arXiv 2502.05027
(2025) -- an iterative dual loop around an unmodified distiller. The *outer loop* splits the training data into
a trusted and an untrusted space (class-wise "dynamic" Gaussian mixture on per-sample losses) and diverts
distillation to the trusted samples; the *inner loop* recalibrates untrusted samples (Mahalanobis distance and
cosine similarity to class anchors, selective pseudo-labels) and recalls the reliable ones into the trusted
space; a consistency regulariser stabilises the synthetic set. The paper's code and hyperparameters are not
public: everything below marked **[ddfast]** is this project's design (``shared/reference/noisy-labels.md``
§3), each part a documented option of :class:`TADConfig` with an off switch.

Algorithm (one TAD run, ``R = TADConfig.rounds``)::

    round 0: train the scoring network f on the noisy labels for `warmup_epochs` (short: before it memorises
             the noise)                                                          [ddfast: ConvNet, SGD]
    round r = 0 .. R-1:
      (r > 0) refine f on the current trusted set T (fine-tune or retrain)       [ddfast]
      outer loop:   l_i = CE(f(x_i), y~_i)           (ddfast.ops.sample_stats; y~ = labels with pseudo-labels;
                                                      option: 1 - margin instead of the loss)
                    e_i <- m e_i + (1 - m) l_i       (in-place EMA over rounds: the "dynamic" loss; m=0: none)
                    w_i = posterior of the low-loss component of a 2-GMM fitted per class on e (classwise_gmm)
                    T = {i : w_i > tau}  (united with the previous round's T: trust_update="grow")
      inner loop:   phi = penultimate features of f; anchors mu_c = mean phi over T_c; Sigma = shrunk pooled
                    within-class covariance of T (Ledoit-Wolf); for i not in T, with d_ic = Mahalanobis^2 and
                    s_ic = cosine to mu_c (ddfast.ops.anchor_distances) and c* = argmin_c d_ic:
                    recall i with pseudo-label c* if  c* == argmax f(x_i)  and  d_ic* <= q-quantile of the
                    trusted class-c* distances  and  s_ic* >= kappa  and  d_ic* <= rho d_ic' (c' the
                    second-nearest anchor: a ratio test [ddfast])
      diversion:    the distiller sees TrainSet(trusted_mask=T, replacement_labels=pseudo, weights=w) for the
                    parts switched on: expert/pool training, synthetic initialisation, real statistics/batches
      distillation: L_B(S; T) + lambda * L_cons(S), L_cons = CE(f(DSA_1(S)), y_S) + CE(f(DSA_2(S)), y_S) / 2
                    through the distiller's ``extra_loss`` hook

Schedules [ddfast] (``TADConfig.schedule``): ``"pre"`` (default) runs all R rounds of partition/recall first
and then distils once on the final trusted set (experts/pool built once, on the best partition);
``"interleaved"`` distils ``iterations / R`` steps after every round on that round's view (the paper's dual
loop; experts/pool are built on round 0's trusted set, later rounds swap the real-data view with
``Distiller.update_train``). See benchmarks/RESULTS.md ("TAD: trust partition quality") for the measurement
behind the default.

Entry point: :func:`run_tad` (what the CLI calls); the pieces are public too: :class:`TrustScorer` (scoring
network + rounds), :func:`partition` (outer loop), :func:`recall` (inner loop), :func:`diverted_view`,
:class:`ConsistencyRegularizer`, :func:`partition_metrics` and :func:`cleanlab_detector` (diagnostics).

cleanlab comparison and its out-of-sample caveat: ``cleanlab.filter.find_label_issues`` (Northcutt et al.,
JAIR 2021, confident learning) expects *out-of-sample* predicted probabilities. TAD's rounds score every
sample with a network trained on it, so the per-round comparison feeds cleanlab the **same in-sample
predictions of f** that TAD's GMM sees (apples to apples; f is trained for only a few epochs on noisy labels
and has not memorised them, so its in-sample predictions are close to out-of-sample -- the benchmark measures
f's agreement with the noisy labels on the mislabelled samples to show it). With ``cleanlab_folds=K >= 2``,
round 0 additionally runs cleanlab on K-fold cross-validated predictions (K warm-up networks, each scoring
the fold it did not see): cleanlab as its authors intend, at (K-1) times the warm-up cost.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .augment import DSA, Normalize
from .distill.base import DistillConfig, Distiller, SyntheticSet, TrainSet
from .ops import anchor_distances, classwise_gmm, sample_stats

__all__ = [
    "TADConfig",
    "TADResult",
    "TrustState",
    "TrustScorer",
    "ConsistencyRegularizer",
    "run_tad",
    "tad_partition",
    "partition",
    "recall",
    "pooled_precision",
    "diverted_view",
    "partition_metrics",
    "cleanlab_detector",
    "kfold_pred_probs",
    "SCHEDULES",
    "COVARIANCES",
    "REFINES",
]

SCHEDULES = ("pre", "interleaved")
COVARIANCES = ("ledoit_wolf", "fixed", "identity")
REFINES = ("finetune", "retrain", "none")
LOSS_NORMS = ("minmax", "none")
TRUST_UPDATES = ("grow", "refit")
TRUST_STATISTICS = ("loss", "margin")
CONSISTENCY_TARGETS = ("auto", "soft", "hard")
_STATE_FORMAT = "ddfast.TADRound/1"


# ----------------------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------------------
@dataclass
class TADConfig:
    """Every choice of TAD, each with an off switch ([ddfast] unless the paper is cited).

    Rounds and schedule:
        rounds: R >= 1 rounds of partition + recall (the paper's iterations of the dual loop). Default 3.
        schedule: ``"pre"`` -- all rounds first, then one distillation on the final trusted set (default);
            ``"interleaved"`` -- ``iterations // R`` distillation steps after every round (last round takes the
            remainder), experts/pool built on round 0's view, later views swapped in with ``update_train``.

    Scoring network f (trained on the noisy labels; its losses, predictions and features drive everything):
        scorer_model: a :func:`ddfast.models.get_model` name. Default ``"convnet"``.
        scorer_width, scorer_depth, scorer_norm: ConvNet width / depth / norm (used for the ``convnet*``
            names only). Defaults 16 / 3 / ``"instance"``: an eighth-width ConvNet-3, sized so that TAD's own cost
            on 60k Fashion-MNIST stays around two CPU-minutes (benchmarks/RESULTS.md).
        warmup_epochs: epochs of round-0 training (float allowed: 0.5 = half an epoch). Short on purpose: a
            network trained briefly on noisy labels fits the clean majority before it memorises the noise
            (Arpit et al., ICML 2017; DivideMix's warm-up). Default 2.
        scorer_lr, scorer_momentum, scorer_weight_decay, scorer_batch_size: SGD recipe of f.
            Defaults 0.01 / 0.9 / 5e-4 / 256.
        scorer_max_samples: train f on at most this many samples (a seeded random subset; every sample is
            still scored). 0 = all. Default 0.
        scorer_dsa: DSA augmentation while training f (off by default: cost). Default False.
        refine: between rounds, ``"finetune"`` f on the trusted set (with pseudo-labels), ``"retrain"`` a new f
            on it from scratch (``warmup_epochs``), or ``"none"`` (f fixed after the warm-up). Default finetune.
        refine_epochs: epochs of each fine-tuning. Default 1.

    Outer loop (trust partition):
        trust_statistic: what the class-wise GMM sees: ``"loss"`` -- the per-sample cross-entropy of f
            (the paper's per-sample loss; default) or ``"margin"`` -- ``1 - (p_y - max_{k != y} p_k)`` in
            [0, 2], both from :func:`ddfast.ops.sample_stats`. The margin also sees which *other* class f
            prefers and separates structured (asymmetric) flips much better (benchmarks/RESULTS.md).
        loss_ema: momentum m of the in-place loss EMA across rounds ("dynamic" GMM); 0 = no EMA (each round
            uses its own loss). A sample whose label was replaced restarts its EMA. Default 0.5.
        loss_norm: ``"minmax"`` -- losses scaled to [0, 1] over the whole set before the GMM (DivideMix);
            ``"none"``. Default minmax.
        gmm_iters, gmm_tol, gmm_reg_covar: EM iterations / tolerance / variance floor of
            :func:`ddfast.ops.classwise_gmm`. Defaults 20 / 1e-3 / 5e-4 (DivideMix uses 10 / 1e-2 / 5e-4).
        gmm_warm_start: start each round's EM from the previous round's fit instead of "mean_split".
        tau: trusted if the low-loss posterior exceeds tau, in (0, 1). Default 0.5.
        trust_agreement: the GMM may trust a sample only if f's prediction equals its label (a confident-learning
            style filter [ddfast]). Default True. Measured on all 60k Fashion-MNIST images, asym 0.4 (clean rate
            0.759; default scorer, round 0): the loss GMM alone trusts a set of clean precision 0.762 (it barely
            separates pair flips between confusable classes); with the filter 0.912 at recall 0.80 (cleanlab on
            the same predictions: 0.907 / 0.872). Samples kept out only by this filter (low loss,
            f disagrees) are not recall candidates: on a weak scorer their pseudo-labels are mostly wrong.
        trust_update: ``"grow"`` -- a sample trusted in an earlier round stays trusted (T_r = T_{r-1} u GMM_r u
            recalled_r: the trusted space only expands, as the paper describes the dual loop); ``"refit"`` --
            every round's GMM decides afresh (samples can leave T). Default grow.

    Inner loop (recall of untrusted samples):
        recall: switch of the whole inner loop. Default True.
        covariance: ``"ledoit_wolf"`` -- pooled within-class covariance of the trusted features shrunk by
            Ledoit-Wolf (scikit-learn; the shrinkage intensity is estimated from the data, so there is nothing
            to tune and the estimate stays well-conditioned when the trusted set of a class is smaller than
            the feature dimension); ``"fixed"`` -- ``(1 - a) S + a tr(S)/D I`` with ``a = shrinkage``;
            ``"identity"`` -- Euclidean distance (Mahalanobis off). Default ledoit_wolf.
        shrinkage: the fixed coefficient a in [0, 1] (``covariance="fixed"`` only). Default 0.1.
        cov_max_samples: estimate the covariance on at most this many trusted samples (seeded subset);
            0 = all. Default 20000.
        maha_quantile: q in (0, 1]; reliable only if d_ic* <= the q-quantile of the distances of trusted
            class-c* samples to their anchor. 1.0 = off. Default 0.9.
        kappa: cosine threshold in [-1, 1]; reliable only if s_ic* >= kappa. -1 = off. Default 0.5.
        require_agreement: reliable only if c* equals f's prediction. Default True.
        recall_ratio: reliable only if ``d_ic* <= recall_ratio * d_ic'`` (c' the second-nearest anchor): a ratio
            test that refuses samples between two classes; 1.0 = off. Default 0.7 (measured: on Fashion-MNIST
            sym 0.4 it raises the pseudo-label accuracy of the recalled samples from 84% to 99%, and under
            asym 0.4 it stops a recall whose pseudo-labels would be 10% correct; benchmarks/RESULTS.md).
        min_trusted_per_class: each class keeps at least this many trusted samples (the highest-posterior
            ones are added when the GMM leaves fewer); ``run_tad`` raises it to the distiller's IPC. Default 1.

    Diversion (what the distiller sees; noisy-labels.md §3):
        divert_pool: expert trajectories (DATM) / model pool (DANCE, RCIG) trained on the trusted view
            (``True``), on the plain noisy set (``False``), or on *every* sample with TAD's labels (``"relabel"``:
            recalled samples carry their pseudo-labels, no sample is dropped). Measured with DATM (Fashion-MNIST,
            sym 0.4, quick, IPC 10; benchmarks/RESULTS.md "Why TAD lowers DATM"): experts on the trusted view
            lose the hard clean samples of the hard classes (the trusted set holds 34 % of all Shirt images
            against 91 % of all Trouser images) and the distilled set drops from 77.33 % (``False``; base DATM
            77.35 %) to 75.67 % (``True``); ``"relabel"`` gives 76.57 %. Default ``True`` (the paper's design; for
            DATM at CPU scale, ``False`` is the measured better choice).
        divert_init: synthetic images (and DATM's label logits) initialised from the trusted view.
        divert_real: real batches / per-class statistics of distillation steps from the trusted view.
        pass_weights: hand the GMM posteriors (1 for recalled samples) to the distiller as ``weights``.
            All default True.

    Consistency regularisation on the synthetic set:
        consistency_lambda: weight lambda of ``L_cons`` added through ``Distiller.extra_loss``; 0 = off.
            Default 0.1.
        consistency_dsa: DSA strategy of the two views; ``""`` = no augmentation (both views identical).
        consistency_target: ``"auto"`` (softmax of logit labels; argmax of RCIG's regression targets; hard
            labels as they are), ``"soft"`` (always softmax of float labels) or ``"hard"`` (argmax).
        consistency_label_grad: let L_cons move learnable labels too (default False: labels detached).

    Diagnostics:
        cleanlab: run ``cleanlab.filter.find_label_issues`` on f's predictions every round (needs clean
            labels to score it). Default True.
        cleanlab_folds: K >= 2 adds cleanlab on K-fold out-of-sample predictions at round 0; 0 = off.

        seed: seeds f's initialisation, data order, subsets and DSA draws. Default 0.

    Raises ``ValueError`` naming the field for any invalid value (:meth:`validate`).
    """

    rounds: int = 3
    schedule: str = "pre"
    scorer_model: str = "convnet"
    scorer_width: int = 16
    scorer_depth: int = 3
    scorer_norm: str = "instance"
    warmup_epochs: float = 2.0
    scorer_lr: float = 0.01
    scorer_momentum: float = 0.9
    scorer_weight_decay: float = 5e-4
    scorer_batch_size: int = 256
    scorer_max_samples: int = 0
    scorer_dsa: bool = False
    refine: str = "finetune"
    refine_epochs: float = 1.0
    trust_statistic: str = "loss"
    loss_ema: float = 0.5
    loss_norm: str = "minmax"
    gmm_iters: int = 20
    gmm_tol: float = 1e-3
    gmm_reg_covar: float = 5e-4
    gmm_warm_start: bool = False
    tau: float = 0.5
    trust_agreement: bool = True
    trust_update: str = "grow"
    recall: bool = True
    covariance: str = "ledoit_wolf"
    shrinkage: float = 0.1
    cov_max_samples: int = 20000
    maha_quantile: float = 0.9
    kappa: float = 0.5
    require_agreement: bool = True
    recall_ratio: float = 0.7
    min_trusted_per_class: int = 1
    divert_pool: Union[bool, str] = True
    divert_init: bool = True
    divert_real: bool = True
    pass_weights: bool = True
    consistency_lambda: float = 0.1
    consistency_dsa: str = "color_crop_cutout_flip_scale_rotate"
    consistency_target: str = "auto"
    consistency_label_grad: bool = False
    cleanlab: bool = True
    cleanlab_folds: int = 0
    seed: int = 0

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------------------------------------
    def validate(self) -> "TADConfig":
        """Raises ``ValueError`` naming the first invalid field; returns ``self``."""
        def intf(name, lo):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"TADConfig.{name} must be an int >= {lo}, got {v!r}")

        def realf(name, lo, hi, lo_open=False, hi_open=False):
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
            if ok:
                v = float(v)
                ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
            if not ok:
                rng = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
                raise ValueError(f"TADConfig.{name} must be a finite number in {rng}, got {getattr(self, name)!r}")

        def choice(name, options):
            v = getattr(self, name)
            if v not in options:
                raise ValueError(f"TADConfig.{name} must be one of {options}, got {v!r}")

        def boolf(name):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TADConfig.{name} must be a bool, got {getattr(self, name)!r}")

        intf("rounds", 1)
        choice("schedule", SCHEDULES)
        if not isinstance(self.scorer_model, str) or not self.scorer_model:
            raise ValueError(f"TADConfig.scorer_model must be a model name, got {self.scorer_model!r}")
        intf("scorer_width", 1)
        intf("scorer_depth", 1)
        choice("scorer_norm", ("instance", "batch", "layer", "none"))
        realf("warmup_epochs", 0.0, 1e6, lo_open=True)
        realf("scorer_lr", 0.0, 1e3, lo_open=True)
        realf("scorer_momentum", 0.0, 1.0, hi_open=True)
        realf("scorer_weight_decay", 0.0, 1.0)
        intf("scorer_batch_size", 1)
        intf("scorer_max_samples", 0)
        boolf("scorer_dsa")
        choice("refine", REFINES)
        realf("refine_epochs", 0.0, 1e6)
        choice("trust_statistic", TRUST_STATISTICS)
        realf("loss_ema", 0.0, 1.0, hi_open=True)
        choice("loss_norm", LOSS_NORMS)
        intf("gmm_iters", 1)
        realf("gmm_tol", 0.0, 1e6)
        realf("gmm_reg_covar", 0.0, 1e6, lo_open=True)
        boolf("gmm_warm_start")
        realf("tau", 0.0, 1.0, lo_open=True, hi_open=True)
        choice("trust_update", TRUST_UPDATES)
        boolf("recall")
        choice("covariance", COVARIANCES)
        realf("shrinkage", 0.0, 1.0)
        intf("cov_max_samples", 0)
        realf("maha_quantile", 0.0, 1.0, lo_open=True)
        realf("kappa", -1.0, 1.0)
        boolf("require_agreement")
        realf("recall_ratio", 0.0, 1.0, lo_open=True)
        intf("min_trusted_per_class", 0)
        if not (isinstance(self.divert_pool, bool) or self.divert_pool == "relabel"):
            raise ValueError(f"TADConfig.divert_pool must be True, False or 'relabel', got {self.divert_pool!r}")
        for name in ("trust_agreement", "divert_init", "divert_real", "pass_weights",
                     "consistency_label_grad",
                     "cleanlab"):
            boolf(name)
        realf("consistency_lambda", 0.0, 1e6)
        if not isinstance(self.consistency_dsa, str):
            raise ValueError(f"TADConfig.consistency_dsa must be a DSA strategy string, got {self.consistency_dsa!r}")
        if self.consistency_dsa:
            try:
                DSA(self.consistency_dsa)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"TADConfig.consistency_dsa: {exc}") from None
        choice("consistency_target", CONSISTENCY_TARGETS)
        v = self.cleanlab_folds
        if isinstance(v, bool) or not isinstance(v, int) or v < 0 or v == 1:
            raise ValueError(f"TADConfig.cleanlab_folds must be 0 (off) or an int >= 2, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"TADConfig.seed must be an int, got {self.seed!r}")
        return self

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TADConfig":
        """Builds a config from a dict; unknown keys raise ``ValueError`` naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"TADConfig: unknown option(s) {unknown}; known: {sorted(names)}")
        return cls(**d)

    def replace(self, **overrides: Any) -> "TADConfig":
        """A validated copy with ``overrides`` (unknown names raise ``ValueError``)."""
        d = self.to_dict()
        d.update(overrides)
        return TADConfig.from_dict(d)


# ----------------------------------------------------------------------------------------------------------
# trust state of one round
# ----------------------------------------------------------------------------------------------------------
@dataclass
class TrustState:
    """The trust information after a round (all tensors on CPU, length N).

    Attributes:
        round: index r of the round that produced it.
        trusted: ``bool [N]`` -- the trusted set T after recall.
        replacement: ``int64 [N]`` -- pseudo-label of recalled samples, ``-1`` where the given label stands.
        weights: ``float32 [N]`` -- GMM posterior of the low-loss component (1 for recalled samples).
        ema: ``float32 [N]`` -- the EMA of the trust statistic (the GMM's input before normalisation): the loss
            in nats, or ``1 - margin``.
        ema_labels: ``int64 [N]`` -- the labels ``ema`` was computed against (a sample whose label changes
            afterwards restarts its EMA next round).
        gmm: ``{"weights", "means", "variances"}`` ``[C, 2]`` of the last fit (warm start).
    """

    round: int
    trusted: torch.Tensor
    replacement: torch.Tensor
    weights: torch.Tensor
    ema: torch.Tensor
    ema_labels: torch.Tensor
    gmm: Dict[str, torch.Tensor] = field(default_factory=dict)

    def effective_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """``int64 [N]``: ``labels`` with the pseudo-labels applied."""
        return torch.where(self.replacement >= 0, self.replacement, labels)


# ----------------------------------------------------------------------------------------------------------
# outer loop: partition
# ----------------------------------------------------------------------------------------------------------
def _normalise_losses(values: torch.Tensor, how: str) -> torch.Tensor:
    if how == "none":
        return values
    lo, hi = values.min(), values.max()
    return (values - lo) / (hi - lo).clamp_min(1e-12)


def partition(losses: torch.Tensor, labels: torch.Tensor, num_classes: int, *, tau: float = 0.5,
              loss_norm: str = "minmax", gmm_iters: int = 20, gmm_tol: float = 1e-3, gmm_reg_covar: float = 5e-4,
              init: Union[str, Sequence[torch.Tensor]] = "mean_split", min_per_class: int = 0,
              eligible: Optional[torch.Tensor] = None):
    """Outer loop of TAD: class-wise two-component GMM on per-sample losses, trusted = low-loss component.

    Per class c, a 1-D 2-GMM is fitted by EM (:func:`ddfast.ops.classwise_gmm`) to the (normalised) losses of
    the samples labelled c; ``w_i`` is sample i's posterior of the lower-mean component and the trusted set is
    ``T = {i : w_i > tau}`` (TAD arXiv 2502.05027, outer loop; the loss GMM of DivideMix, Li et al. ICLR 2020).
    Classes left with fewer than ``min_per_class`` trusted samples get their highest-posterior samples added
    [ddfast] (a distiller needs IPC samples per class).

    Args:
        losses: ``float32/float64 [N]`` per-sample losses (nats), e.g. the EMA of :func:`sample_stats`.
        labels: ``int64 [N]`` labels the losses were computed against, in ``[0, num_classes)``.
        num_classes: C.
        tau: posterior threshold in (0, 1).
        loss_norm: ``"minmax"`` (scale to [0, 1] over all samples first) or ``"none"``.
        gmm_iters, gmm_tol, gmm_reg_covar, init: passed to :func:`classwise_gmm`.
        min_per_class: minimum trusted samples per class (0 = no fallback).
        eligible: optional ``bool [N]``: only these samples can be trusted by the GMM rule,
            ``T = {i : w_i > tau and eligible_i}`` (TAD's ``trust_agreement``: f's prediction equals the label).
            The per-class minimum fills from eligible samples first, by posterior.

    Returns:
        ``(trusted bool [N], posterior float32 [N], fit GMMFit, n_fallback int)``.

    Raises:
        ValueError: bad ``tau``/``loss_norm``, or what :func:`classwise_gmm` raises (NaN losses, labels).
    """
    if not 0.0 < float(tau) < 1.0:
        raise ValueError(f"tau must be in (0, 1), got {tau}")
    if loss_norm not in LOSS_NORMS:
        raise ValueError(f"loss_norm must be one of {LOSS_NORMS}, got {loss_norm!r}")
    with torch.no_grad():
        v = _normalise_losses(losses.detach().to(torch.float64), loss_norm)
        fit = classwise_gmm(v, labels, num_classes, gmm_iters, tol=gmm_tol, reg_covar=gmm_reg_covar, init=init)
    w = fit.posterior_low.to(torch.float32)
    trusted = w > tau
    if eligible is not None:
        if eligible.shape != trusted.shape or eligible.dtype != torch.bool:
            raise ValueError(f"eligible must be a bool tensor of shape {tuple(trusted.shape)}, got "
                             f"{eligible.dtype} {tuple(eligible.shape)}")
        trusted &= eligible
    n_fallback = 0
    if min_per_class > 0:
        for c in range(num_classes):
            in_c = labels == c
            have = int((trusted & in_c).sum())
            need = min(min_per_class, int(in_c.sum())) - have
            if need > 0:
                cand = torch.nonzero(in_c & ~trusted).flatten()
                key = w[cand] if eligible is None else w[cand] + eligible[cand].to(w.dtype)  # eligible first
                order = torch.argsort(key, descending=True, stable=True)[:need]
                trusted[cand[order]] = True
                n_fallback += int(order.numel())
    return trusted, w, fit, n_fallback


# ----------------------------------------------------------------------------------------------------------
# inner loop: anchors, shrunk covariance, reliability, recall
# ----------------------------------------------------------------------------------------------------------
def pooled_precision(features: torch.Tensor, labels: torch.Tensor, anchors: torch.Tensor, *,
                     method: str = "ledoit_wolf", shrinkage: float = 0.1, max_samples: int = 0,
                     generator: Optional[torch.Generator] = None) -> Tuple[Optional[torch.Tensor], float]:
    """Precision matrix of the pooled within-class covariance of ``features`` [ddfast].

    The features are centred on their class anchor (``f_i - mu_{y_i}``) and their covariance S (about zero
    mean, float64) is shrunk towards ``tr(S)/D I``, ``Sigma = (1 - a) S + a tr(S)/D I``, and inverted by
    Cholesky (pseudo-inverse if singular):

    - ``"ledoit_wolf"``: the shrinkage intensity ``a`` of Ledoit & Wolf (J. Multivar. Anal. 2004; minimises the
      expected Frobenius error, estimated from the data) by ``sklearn.covariance.ledoit_wolf_shrinkage(...,
      assume_centered=True)`` -- the estimate is then exactly ``sklearn.covariance.LedoitWolf``'s;
    - ``"fixed"``: ``(1 - a) S + a tr(S)/D I`` with ``a = shrinkage``;
    - ``"identity"``: no covariance (returns None: Euclidean distances).

    Args:
        features: ``float [n, D]`` (trusted features); labels: ``int64 [n]``; anchors: ``float [C, D]``.
        max_samples: estimate on at most this many rows (a random subset drawn with ``generator``); 0 = all.

    Returns:
        ``(precision float32 [D, D] or None, shrinkage used)``.

    Raises:
        ValueError: unknown ``method``, fewer than 2 rows, ``shrinkage`` outside [0, 1].
    """
    if method not in COVARIANCES:
        raise ValueError(f"covariance method must be one of {COVARIANCES}, got {method!r}")
    if method == "identity":
        return None, 1.0
    if features.shape[0] < 2:
        raise ValueError(f"need at least 2 trusted samples to estimate a covariance, got {features.shape[0]}")
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}")
    idx = torch.arange(features.shape[0])
    if max_samples and features.shape[0] > max_samples:
        idx = torch.randperm(features.shape[0], generator=generator)[:max_samples]
    x = (features[idx] - anchors[labels[idx]]).to(torch.float64).cpu()
    D = x.shape[1]
    if method == "ledoit_wolf":
        from sklearn.covariance import ledoit_wolf_shrinkage

        a = float(ledoit_wolf_shrinkage(x.numpy(), assume_centered=True))
    else:
        a = float(shrinkage)
    S = x.T @ x / x.shape[0]
    mu = torch.trace(S) / D
    cov = (1.0 - a) * S + a * mu * torch.eye(D, dtype=torch.float64)
    # shrunk towards a positive multiple of I: SPD unless a == 0 and S is singular (then the pseudo-inverse)
    L, info = torch.linalg.cholesky_ex(cov)
    if int(info) == 0:
        prec = torch.cholesky_inverse(L)
    else:
        prec = torch.linalg.pinv(cov, hermitian=True)
    return (0.5 * (prec + prec.T)).to(torch.float32), a


def recall(features: torch.Tensor, predictions: torch.Tensor, labels: torch.Tensor, trusted: torch.Tensor,
           num_classes: int, *, covariance: str = "ledoit_wolf", shrinkage: float = 0.1, cov_max_samples: int = 0,
           maha_quantile: float = 0.9, kappa: float = 0.5, require_agreement: bool = True,
           distance_ratio: float = 1.0, generator: Optional[torch.Generator] = None) -> Dict[str, Any]:
    """Inner loop of TAD: pseudo-label untrusted samples from trusted class anchors and pick the reliable ones.

    Anchors ``mu_c`` = mean feature of the trusted samples labelled c; ``P`` = precision of their shrunk
    pooled covariance (:func:`pooled_precision`). For every sample, ``d_ic`` (squared Mahalanobis) and
    ``s_ic`` (cosine) to every anchor come from :func:`ddfast.ops.anchor_distances`; the candidate pseudo-label
    is ``c* = argmin_c d_ic`` over classes that have an anchor. An untrusted sample is *reliable* if
    (1) ``c* == predictions[i]`` (when ``require_agreement``), (2) ``d_ic* <=`` the ``maha_quantile``-quantile
    of ``{d_jc* : j trusted, labels[j] == c*}`` (off at 1.0), (3) ``s_ic* >= kappa`` (off at -1) and (4)
    ``d_ic* <= distance_ratio * d_ic'`` with c' the second-nearest anchor (a ratio test that refuses samples
    lying between two classes; off at 1.0).
    (TAD arXiv 2502.05027, inner loop: Mahalanobis distance and cosine similarity to class anchors, selective
    pseudo-labels; the exact rule and thresholds are [ddfast].)

    Args:
        features: ``float32 [N, D]`` penultimate features of the scoring network.
        predictions: ``int64 [N]`` its argmax predictions.
        labels: ``int64 [N]`` current (effective) labels; trusted: ``bool [N]``.
        num_classes: C.
        covariance, shrinkage, cov_max_samples: see :func:`pooled_precision`.
        maha_quantile: q in (0, 1]; kappa: cosine threshold in [-1, 1]; require_agreement: bool;
        distance_ratio: in (0, 1].
        generator: draws the covariance subset.

    Returns:
        dict with ``reliable bool [N]`` (never True for a trusted sample), ``pseudo int64 [N]`` (c* for every
        sample), ``mahalanobis_sq float [N]`` and ``cosine float [N]`` to c*, ``second_sq float [N]`` (to the
        second-nearest anchor; inf when only one class has an anchor), ``thresholds float [C]`` (inf
        where off or no anchor), ``shrinkage`` (float), ``has_anchor bool [C]``.

    Raises:
        ValueError: bad shapes, an empty trusted set, or a threshold outside its range.
    """
    N = features.shape[0]
    if features.dim() != 2 or predictions.shape != (N,) or labels.shape != (N,) or trusted.shape != (N,):
        raise ValueError("recall: features must be [N, D] and predictions/labels/trusted [N]")
    if not 0.0 < maha_quantile <= 1.0:
        raise ValueError(f"maha_quantile must be in (0, 1], got {maha_quantile}")
    if not -1.0 <= kappa <= 1.0:
        raise ValueError(f"kappa must be in [-1, 1], got {kappa}")
    if not 0.0 < distance_ratio <= 1.0:
        raise ValueError(f"distance_ratio must be in (0, 1], got {distance_ratio}")
    if int(trusted.sum()) < 2:
        raise ValueError("recall: the trusted set has fewer than 2 samples; nothing to build anchors from")
    feats = features.to(torch.float32)
    t_idx = torch.nonzero(trusted).flatten()
    t_lab = labels[t_idx]
    D = feats.shape[1]
    counts = torch.bincount(t_lab, minlength=num_classes)
    has_anchor = counts > 0
    sums = torch.zeros(num_classes, D, dtype=torch.float64).index_add_(0, t_lab, feats[t_idx].to(torch.float64))
    anchors = (sums / counts.clamp_min(1).unsqueeze(1).to(torch.float64)).to(torch.float32)
    precision, shrink = pooled_precision(feats[t_idx], t_lab, anchors, method=covariance, shrinkage=shrinkage,
                                         max_samples=cov_max_samples, generator=generator)
    with torch.no_grad():
        dist = anchor_distances(feats, anchors, precision)
    maha = dist.mahalanobis_sq.masked_fill(~has_anchor.unsqueeze(0), float("inf"))
    pseudo = maha.argmin(1)
    ar = torch.arange(N)
    d_star = maha[ar, pseudo]
    s_star = dist.cosine[ar, pseudo]
    thresholds = torch.full((num_classes,), float("inf"))
    if maha_quantile < 1.0:
        d_own = maha[t_idx, t_lab]
        for c in range(num_classes):
            dc = d_own[t_lab == c]
            if dc.numel():
                thresholds[c] = torch.quantile(dc.to(torch.float64), maha_quantile).to(torch.float32)
    ok = ~trusted & has_anchor[pseudo] & (d_star <= thresholds[pseudo])
    if kappa > -1.0:
        ok &= s_star >= kappa
    if require_agreement:
        ok &= pseudo == predictions
    second = None
    if num_classes > 1:
        second = maha.topk(2, dim=1, largest=False).values[:, 1]
        if distance_ratio < 1.0:
            ok &= d_star <= distance_ratio * second
    return {"reliable": ok, "pseudo": pseudo, "mahalanobis_sq": d_star, "cosine": s_star, "second_sq": second,
            "thresholds": thresholds, "shrinkage": shrink, "has_anchor": has_anchor}


# ----------------------------------------------------------------------------------------------------------
# diagnostics
# ----------------------------------------------------------------------------------------------------------
def partition_metrics(selected: torch.Tensor, correct: torch.Tensor) -> Dict[str, Optional[float]]:
    """Precision and recall of ``selected`` (bool [N]) as a detector of ``correct`` (bool [N]: the sample's
    current label is its true label): ``precision = |sel & correct| / |sel|``, ``recall = |sel & correct| /
    |correct|`` (None when a denominator is 0), plus ``f1``."""
    sel, cor = selected.bool(), correct.bool()
    tp = int((sel & cor).sum())
    ns, nc = int(sel.sum()), int(cor.sum())
    p = tp / ns if ns else None
    r = tp / nc if nc else None
    f1 = (2 * p * r / (p + r)) if (p is not None and r is not None and p + r > 0) else None
    return {"precision": p, "recall": r, "f1": f1}


def cleanlab_detector(labels: torch.Tensor, pred_probs: torch.Tensor) -> torch.Tensor:
    """``bool [N]``: the samples cleanlab's confident learning keeps as clean, i.e. the complement of
    ``cleanlab.filter.find_label_issues(labels, pred_probs)`` (Northcutt, Jiang, Chuang, JAIR 2021;
    ``filter_by="prune_by_noise_rate"``, one process). ``pred_probs`` should be out-of-sample (module
    docstring: what TAD feeds it). Raises ``ValueError`` (from cleanlab) e.g. when a class has no sample."""
    from cleanlab.filter import find_label_issues

    p = pred_probs.detach().to(torch.float64).cpu()
    p = (p / p.sum(1, keepdim=True)).numpy()
    issues = find_label_issues(labels.cpu().numpy(), p, n_jobs=1)
    return ~torch.from_numpy(issues.astype(bool))


def _acc(a: torch.Tensor, b: torch.Tensor) -> Optional[float]:
    return float((a == b).double().mean()) if a.numel() else None


# ----------------------------------------------------------------------------------------------------------
# the scoring network
# ----------------------------------------------------------------------------------------------------------
def _seed(*parts: int) -> int:
    h = hashlib.sha256(("tad:" + ":".join(str(int(p)) for p in parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 62) - 1)


class TrustScorer:
    """The scoring network f of TAD and its training/scoring passes [ddfast].

    Args:
        config: :class:`TADConfig` (``scorer_*``, ``warmup_epochs``, ``refine*``, ``seed``).
        in_channels, num_classes, im_size: data geometry.
        mean, std: per-channel statistics; f sees ``(x - mean) / std`` (:class:`ddfast.augment.Normalize`).
        device: where f trains and scores.
    """

    def __init__(self, config: TADConfig, in_channels: int, num_classes: int, im_size, mean, std,
                 device: Union[str, torch.device] = "cpu"):
        self.config = config
        self.in_channels, self.num_classes, self.im_size = int(in_channels), int(num_classes), tuple(im_size)
        self.device = torch.device(device)
        self.norm = Normalize(mean, std).to(self.device)
        self.model = self.new_model(0)

    def new_model(self, version: int) -> nn.Module:
        """A freshly initialised f (seeded by ``config.seed`` and ``version``)."""
        from .models import get_model

        cfg = self.config
        kw = {}
        if cfg.scorer_model.lower().replace("-", "_") in ("convnet", "convnet_datm"):
            kw = {"width": cfg.scorer_width, "depth": cfg.scorer_depth, "norm": cfg.scorer_norm}
        try:
            m = get_model(cfg.scorer_model, self.in_channels, self.num_classes, self.im_size,
                          seed=_seed(cfg.seed, 11, version) % (2 ** 31), **kw)
        except ValueError as exc:
            raise ValueError(f"TADConfig.scorer_model / scorer_*: {exc}") from None
        return m.to(self.device)

    def train(self, images: torch.Tensor, labels: torch.Tensor, epochs: float, seed: int,
              model: Optional[nn.Module] = None) -> nn.Module:
        """Trains ``model`` (default: ``self.model``) with SGD for ``epochs`` (float) passes over
        ``(images [n, C, H, W] in [0, 1], labels int64 [n])``, cross-entropy, batches drawn with a generator
        seeded by ``seed``. Returns the model in eval mode."""
        cfg = self.config
        model = self.model if model is None else model
        n = images.shape[0]
        if n == 0:
            raise ValueError("TrustScorer.train: no samples to train on")
        g = torch.Generator().manual_seed(int(seed))
        if cfg.scorer_max_samples and n > cfg.scorer_max_samples:
            keep = torch.randperm(n, generator=g)[: cfg.scorer_max_samples]
            images, labels, n = images[keep], labels[keep], cfg.scorer_max_samples
        bs = min(cfg.scorer_batch_size, n)
        per_epoch = math.ceil(n / bs)
        steps = max(1, int(math.ceil(float(epochs) * per_epoch)))
        opt = torch.optim.SGD(model.parameters(), lr=cfg.scorer_lr, momentum=cfg.scorer_momentum,
                              weight_decay=cfg.scorer_weight_decay)
        dsa = DSA() if cfg.scorer_dsa else None
        model.train()
        perm = None
        for s in range(steps):
            b = s % per_epoch
            if b == 0:
                perm = torch.randperm(n, generator=g)
            idx = perm[b * bs:(b + 1) * bs]
            xb = self.norm.transform(images[idx].to(self.device, torch.float32))
            if dsa is not None:
                xb = dsa(xb, int(torch.randint(2 ** 62, (1,), generator=g)))
            loss = F.cross_entropy(model(xb), labels[idx].to(self.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        return model

    @torch.no_grad()
    def score(self, images: torch.Tensor, model: Optional[nn.Module] = None,
              batch_size: int = 1024) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(logits float32 [N, C], features float32 [N, D])`` of f (eval mode) on CPU."""
        model = self.model if model is None else model
        model.eval()
        logits, feats = [], []
        for i in range(0, images.shape[0], batch_size):
            x = self.norm.transform(images[i:i + batch_size].to(self.device, torch.float32))
            z, h = model(x, output="both")
            logits.append(z.float().cpu())
            feats.append(h.float().cpu())
        return torch.cat(logits), torch.cat(feats)


def kfold_pred_probs(scorer: TrustScorer, images: torch.Tensor, labels: torch.Tensor, folds: int,
                     seed: int) -> torch.Tensor:
    """Out-of-sample predicted probabilities ``float32 [N, C]``: K warm-up networks (same recipe as f), each
    trained on K-1 folds and scoring the held-out fold (cleanlab's intended input). Folds are a seeded random
    split. Raises ``ValueError`` for ``folds < 2``."""
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    N = images.shape[0]
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(_seed(seed, 31)))
    probs = torch.empty(N, scorer.num_classes)
    for k in range(folds):
        held = perm[k::folds]
        mask = torch.ones(N, dtype=torch.bool)
        mask[held] = False
        m = scorer.new_model(1000 + k)
        scorer.train(images[mask], labels[mask], scorer.config.warmup_epochs, _seed(seed, 32, k), model=m)
        logits, _ = scorer.score(images[held], model=m)
        probs[held] = torch.softmax(logits, 1)
    return probs


# ----------------------------------------------------------------------------------------------------------
# diversion
# ----------------------------------------------------------------------------------------------------------
def diverted_view(train: TrainSet, state: Optional[TrustState], divert: Union[bool, str],
                  pass_weights: bool = True) -> TrainSet:
    """The TrainSet a distiller part sees [ddfast]:

    - ``divert=True`` and a state: ``trusted_mask = state.trusted``, ``replacement_labels = state.replacement``
      and (``pass_weights``) ``weights = state.weights`` -- the trusted view;
    - ``divert="relabel"`` and a state: every sample (no mask, no weights) with ``replacement_labels =
      state.replacement`` -- the noisy set with TAD's pseudo-labels applied;
    - otherwise the plain noisy set (trust fields cleared).

    Raises ``ValueError`` for any other ``divert``."""
    if not (isinstance(divert, bool) or divert == "relabel"):
        raise ValueError(f"divert must be True, False or 'relabel', got {divert!r}")
    if not divert or state is None:
        return dataclasses.replace(train, weights=None, trusted_mask=None, replacement_labels=None)
    if divert == "relabel":
        return dataclasses.replace(train, weights=None, trusted_mask=None,
                                   replacement_labels=state.replacement.clone())
    return dataclasses.replace(train, trusted_mask=state.trusted.clone(), replacement_labels=state.replacement.clone(),
                               weights=state.weights.clone() if pass_weights else None)


class _DivertedRun:
    """Runs a distiller with one view per part [ddfast].

    ``Distiller.run`` takes a single TrainSet; TAD needs three: ``prepare`` (experts / pool) sees the pool
    view -- once per distiller object --, ``initialize`` the init view, and the distillation steps the real
    view. For the duration of the call the two hooks are overridden on the instance; the real-data view is
    swapped in with the distiller's own ``update_train`` (its contract: swap the real data, keep the synthetic
    set and the experts/pool) right after ``prepare`` and around ``initialize``, so a distiller that indexes
    its real data in ``prepare`` (DANCE, RCIG) still draws its steps from the real view.
    """

    def __init__(self, distiller: Distiller):
        self.d = distiller
        self.prepared = False

    def run(self, pool_view: TrainSet, init_view: TrainSet, real_view: TrainSet, *, initialize: bool, until: int,
            checkpoint_dir: Optional[str], resume: bool, callback=None) -> SyntheticSet:
        d, cls = self.d, type(self.d)

        def prepare(_train):
            if not self.prepared:
                cls.prepare(d, pool_view)
                self.prepared = True
            d.update_train(real_view)

        def init(_train):
            d.update_train(init_view)
            cls.initialize(d, init_view)
            d.update_train(real_view)

        d.prepare, d.initialize = prepare, init
        try:
            return d.run(real_view, initialize=initialize, until=until, checkpoint_dir=checkpoint_dir,
                         resume=resume, callback=callback)
        finally:
            del d.prepare
            del d.initialize


# ----------------------------------------------------------------------------------------------------------
# consistency regularisation
# ----------------------------------------------------------------------------------------------------------
def _synset_transform(syn: SyntheticSet):
    """The network-input transform a synthetic set lives in, from its ``preprocess`` record
    (``{"transform": kind}`` + state, or ``mean``/``std`` + optional ``zca`` with ``zca.*`` tensors)."""
    from .augment import ZCA, Compose, Identity, transform_from_state_dict

    pre, state = dict(syn.preprocess or {}), dict(syn.preprocess_state or {})
    kind = pre.get("transform") or pre.get("kind")
    if isinstance(kind, str):
        sub = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("transform.")}
        return transform_from_state_dict(kind, sub or state)
    parts = []
    if pre.get("mean") is not None and pre.get("std") is not None and pre.get("normalize", True):
        parts.append(Normalize(pre["mean"], pre["std"]))
    if pre.get("zca"):
        zs = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("zca.")}
        if not zs:
            raise ValueError("synthetic set says zca=True but holds no zca.* tensors")
        parts.append(ZCA.from_state_dict(zs))
    if not parts:
        return Identity()
    return parts[0] if len(parts) == 1 else Compose(*parts)


class ConsistencyRegularizer:
    """TAD's consistency regularisation on the synthetic set, used as ``Distiller.extra_loss`` [ddfast].

    ``L = lambda * (CE(f(A_1(x)), t) + CE(f(A_2(x)), t)) / 2`` over the synthetic images ``x`` handed to the
    hook, where f is the (frozen) scoring network, ``A_1, A_2`` two DSA draws (Zhao & Bilen 2021) and ``t`` the
    image's label as a distribution (``consistency_target``): softmax of logit labels (DATM), one-hot of hard
    labels, one-hot of the argmax of RCIG's regression targets (``"auto"``). The images are mapped from the
    distiller's input space to f's (``(x_pixels - mean) / std``) by inverting the distiller's transform (read
    from ``distiller.synthetic_set().preprocess`` on the first call; ZCA included). Gradients flow to the
    images (and, with ``consistency_label_grad``, to learnable labels); f's parameters are frozen.

    DSA seeds derive from ``(config.seed, distiller.iteration, call index within the iteration)``, so a
    resumed distillation draws the same views as an uninterrupted one.

    Call: ``reg(images float [M, C, H, W], labels int64 [M] | float [M, num_classes]) -> scalar Tensor``.
    Raises ``ValueError`` for mismatched shapes.
    """

    def __init__(self, model: nn.Module, config: TADConfig, mean, std, distiller: Optional[Distiller] = None,
                 to_scorer: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.config = config
        self.lam = float(config.consistency_lambda)
        self.dsa = DSA(config.consistency_dsa) if config.consistency_dsa else None
        self.norm = Normalize(mean, std)
        self.distiller = distiller
        self._to_scorer = to_scorer
        self._mse_labels = None
        self._calls = (-1, 0)

    def _mapping(self, device):
        if self._to_scorer is None:
            if self.distiller is None:
                raise ValueError("ConsistencyRegularizer needs a distiller or an explicit to_scorer mapping")
            syn = self.distiller.synthetic_set()
            t = _synset_transform(syn)
            self._mse_labels = (syn.eval_config or {}).get("loss") == "mse"
            norm = self.norm.to(device)
            t = t.to(device) if hasattr(t, "to") else t
            self._to_scorer = lambda x: norm.transform(t.inverse(x))
        return self._to_scorer

    def target(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        """``float [M, C]`` target distribution of ``labels`` (see class docstring)."""
        mode = self.config.consistency_target
        if not labels.is_floating_point():
            return F.one_hot(labels.long(), num_classes).float()
        lab = labels if self.config.consistency_label_grad else labels.detach()
        if mode == "hard" or (mode == "auto" and self._mse_labels):
            return F.one_hot(lab.argmax(1), num_classes).float()
        return torch.softmax(lab, dim=1)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"consistency: images [M, C, H, W] and labels [M, ...] expected, got "
                             f"{tuple(images.shape)} and {tuple(labels.shape)}")
        to_f = self._mapping(images.device)
        self.model.to(images.device)
        it = int(self.distiller.iteration) if self.distiller is not None else 0
        k = self._calls[1] + 1 if self._calls[0] == it else 0
        self._calls = (it, k)
        x = to_f(images)
        logits_a = self.model(self.dsa(x, _seed(self.config.seed, 41, it, k, 0)) if self.dsa else x)
        logits_b = self.model(self.dsa(x, _seed(self.config.seed, 41, it, k, 1)) if self.dsa else x)
        t = self.target(labels, logits_a.shape[1]).to(logits_a.dtype)
        ce = lambda z: -(t * torch.log_softmax(z, 1)).sum(1).mean()  # noqa: E731
        return self.lam * 0.5 * (ce(logits_a) + ce(logits_b))


# ----------------------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------------------
@dataclass
class TADResult:
    """What :func:`run_tad` returns. Unpacks as ``synset, rounds = result``.

    Attributes:
        synset: the distilled :class:`SyntheticSet` (``metadata["tad"]`` holds the config and summary).
        rounds: per-round diagnostics (JSON-able dicts; schema in :func:`run_tad`).
        summary: JSON-able totals (final |T|, precision, recall, TAD overhead seconds, ...).
        state: the final :class:`TrustState` (trusted mask, pseudo-labels, weights).
        config: the :class:`TADConfig` used.
    """

    synset: SyntheticSet
    rounds: List[Dict[str, Any]]
    summary: Dict[str, Any]
    state: TrustState
    config: TADConfig

    def __iter__(self):
        return iter((self.synset, self.rounds))


def _labels_digest(train: TrainSet) -> str:
    h = hashlib.sha256()
    h.update(train.labels.cpu().numpy().tobytes())
    h.update(str(tuple(train.images.shape)).encode())
    h.update(train.images[:: max(1, train.images.shape[0] // 64)].cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class _RoundStore:
    """Per-round TAD checkpoints: ``<dir>/tad/round_<r>.safetensors`` (tensors + JSON metadata, atomic)."""

    def __init__(self, checkpoint_dir: Optional[str], fingerprint: Dict[str, Any]):
        self.dir = os.path.join(checkpoint_dir, "tad") if checkpoint_dir else None
        self.fingerprint = fingerprint

    def path(self, r: int) -> str:
        return os.path.join(self.dir, f"round_{r:03d}.safetensors")

    def save(self, r: int, state: TrustState, model: nn.Module, diagnostics: List[Dict[str, Any]]) -> None:
        if self.dir is None:
            return
        from .io import save_tensors

        tensors = {"trusted": state.trusted.to(torch.uint8), "replacement": state.replacement,
                   "weights": state.weights, "ema": state.ema, "ema_labels": state.ema_labels}
        for k, v in state.gmm.items():
            tensors[f"gmm.{k}"] = v
        for k, v in model.state_dict().items():
            tensors[f"scorer.{k}"] = v.detach().cpu()
        meta = {"format": _STATE_FORMAT, "round": r, "fingerprint": self.fingerprint, "diagnostics": diagnostics}
        save_tensors(tensors, self.path(r), meta=meta)

    def latest(self, rounds: int) -> Optional[int]:
        if self.dir is None:
            return None
        done = None
        for r in range(rounds):
            if os.path.exists(self.path(r)):
                done = r
            else:
                break
        return done

    def load(self, r: int, model: nn.Module) -> Tuple[TrustState, List[Dict[str, Any]]]:
        from .io import load_tensors

        tensors, meta = load_tensors(self.path(r))
        if not isinstance(meta, dict) or meta.get("format") != _STATE_FORMAT:
            raise ValueError(f"{self.path(r)}: not a TAD round checkpoint")
        if meta.get("fingerprint") != self.fingerprint:
            old, new = meta.get("fingerprint", {}), self.fingerprint
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise ValueError(f"{self.path(r)} was written by another TAD run (differs in {diff}); use a new "
                             "checkpoint directory or the same options")
        sd = {k[len("scorer."):]: v for k, v in tensors.items() if k.startswith("scorer.")}
        model.load_state_dict(sd)
        gmm = {k[len("gmm."):]: v for k, v in tensors.items() if k.startswith("gmm.")}
        state = TrustState(round=r, trusted=tensors["trusted"].bool(), replacement=tensors["replacement"].long(),
                           weights=tensors["weights"].float(), ema=tensors["ema"].float(),
                           ema_labels=tensors["ema_labels"].long(), gmm=gmm)
        return state, list(meta.get("diagnostics", []))


def _clean_labels_of(clean_labels, n: int) -> Optional[torch.Tensor]:
    if clean_labels is None:
        return None
    if hasattr(clean_labels, "clean_labels"):  # ddfast.noise.NoisyLabels
        clean_labels = clean_labels.clean_labels
        if clean_labels is None:
            return None
    t = torch.as_tensor(clean_labels)
    if t.dtype == torch.bool or t.is_floating_point() or t.shape != (n,):
        raise ValueError(f"clean_labels must be the true labels, int64 [{n}] (or a NoisyLabels), got "
                         f"{t.dtype} {tuple(t.shape)}")
    return t.long().cpu()


def _parse_args(args, kwargs):
    """``run_tad(distiller, train[, config])`` or ``run_tad(method, distill_config, train[, config])``."""
    if not args:
        raise TypeError("run_tad needs a distiller (or a method name and its config) and a TrainSet")
    first, rest = args[0], list(args[1:])
    if isinstance(first, Distiller):
        if kwargs.get("distill_config") is not None:
            raise TypeError("run_tad: distill_config is only for the run_tad(method, distill_config, train) form")
        distiller = first
    elif isinstance(first, str):
        dcfg = rest.pop(0) if rest and not isinstance(rest[0], TrainSet) else kwargs.get("distill_config")
        if not isinstance(dcfg, DistillConfig):
            raise TypeError("run_tad(method, distill_config, train, ...): distill_config must be a DistillConfig "
                            "(ddfast.distill.make_config)")
        from .distill import make_distiller

        distiller = make_distiller(first, dcfg, device=kwargs.get("device") or "cpu", cache_dir=kwargs.get("cache_dir"),
                                   quiet=bool(kwargs.get("quiet", False)))
    else:
        raise TypeError(f"run_tad: first argument must be a Distiller or a method name, got {type(first).__name__}")
    train = rest.pop(0) if rest else kwargs.get("train")
    if not isinstance(train, TrainSet):
        raise TypeError(f"run_tad: train must be a TrainSet, got {type(train).__name__}")
    config = rest.pop(0) if rest else kwargs.get("config")
    if rest:
        raise TypeError(f"run_tad: too many positional arguments ({len(args)})")
    return distiller, train, config


def run_tad(*args, config: Optional[TADConfig] = None, distill_config: Optional[DistillConfig] = None,
            train: Optional[TrainSet] = None, clean_labels=None, device: Optional[Union[str, torch.device]] = None,
            cache_dir: Optional[str] = None, checkpoint_dir: Optional[str] = None, resume: bool = True,
            quiet: bool = False, callback: Optional[Callable[[Distiller, Dict[str, float]], None]] = None,
            **overrides: Any) -> TADResult:
    """Runs a distiller under trust-aware diversion (TAD, arXiv 2502.05027; module docstring).

    Call forms::

        run_tad(distiller, train, config=None, *, clean_labels=None, checkpoint_dir=None, resume=True, quiet=False,
                **tad_overrides)
        run_tad("datm", distill_config, train, config=None, *, device="cpu", cache_dir=None, ...)

    Args:
        distiller: a :class:`~ddfast.distill.base.Distiller` (its device, cache and config are used), or a
            method name with ``distill_config`` (a :class:`DistillConfig`; ``device``/``cache_dir``/``quiet``
            build the distiller).
        train: the noisy :class:`TrainSet` (``labels`` are the given labels; trust fields it carries are
            ignored and replaced).
        config: :class:`TADConfig`, a dict of its fields, or None (defaults); ``**overrides`` replace fields
            (e.g. ``rounds=2, seed=1``; unknown names raise ``ValueError``).
        clean_labels: ``int64 [N]`` true labels, or the :class:`ddfast.noise.NoisyLabels` (its ``clean_labels``),
            for the precision/recall diagnostics; never used by TAD itself.
        device: where f runs (default: the distiller's device).
        checkpoint_dir: per-round TAD state in ``<dir>/tad/``, the distiller's checkpoint in ``<dir>/distill/``.
            With ``resume``, finished rounds are loaded, not recomputed, and the distiller resumes from its
            checkpoint: the result equals an uninterrupted run's.
        quiet: no progress lines.
        callback: passed to ``Distiller.run`` (called after every distillation step).

    Returns:
        :class:`TADResult` (``synset, rounds = result``). Each round dict holds (``None`` where not known):
        ``round``, ``n``, ``n_trusted_gmm`` (GMM partition), ``n_fallback`` (added by the per-class minimum),
        ``n_kept`` (trusted earlier, rejected by this round's GMM, kept by ``trust_update="grow"``),
        ``n_untrusted`` (the recall candidates), ``n_recalled``, ``n_relabelled`` (recalled with a label different
        from their current one), ``n_trusted`` (after recall), ``trusted_fraction``, ``gmm_shrinkage`` (the
        Ledoit-Wolf intensity used),
        ``scorer_agreement`` (f's predictions == current labels), ``seconds`` (dict of wall seconds: scorer,
        score, gmm, recall, cleanlab, total -- total excludes cleanlab -- and cpu: the process CPU seconds of
        scorer..recall, a load-independent cost measure on a shared machine) and, with clean labels:
        ``label_accuracy`` (current labels before the round's recall vs truth), ``label_accuracy_after``,
        ``scorer_accuracy`` (f's predictions vs truth), ``scorer_noisy_fit`` (share of the wrongly labelled
        samples whose wrong label f predicts: memorisation; low = f's predictions are near out-of-sample), ``gmm_precision``/``gmm_recall`` (the GMM partition as
        a detector of correctly-labelled samples), ``precision``/``recall`` (the trusted set after recall,
        same definition on the labels after recall), ``pseudo_label_accuracy`` (recalled samples' pseudo-labels
        vs truth), ``replaced_label_accuracy`` (the labels those pseudo-labels replace), ``candidate_pseudo_accuracy``
        / ``candidate_label_accuracy`` (the same on every untrusted sample), ``cleanlab_n_clean``,
        ``cleanlab_precision``/``cleanlab_recall`` (cleanlab on the same in-sample predictions and labels as the
        GMM), at round 0 with ``cleanlab_folds``: ``cleanlab_oos_*``; with the interleaved schedule
        ``start_iteration``/``end_iteration``.

    Raises:
        TypeError: wrong argument types. ValueError: bad config fields (named), clean labels of the wrong
        shape, a checkpoint directory written by another TAD run, a class without any sample.
    """
    distiller, train_, cfg_in = _parse_args(args, {"distill_config": distill_config, "train": train,
                                                   "config": config, "device": device, "cache_dir": cache_dir,
                                                   "quiet": quiet})
    if cfg_in is None:
        cfg = TADConfig()
    elif isinstance(cfg_in, TADConfig):
        cfg = cfg_in
    elif isinstance(cfg_in, dict):
        cfg = TADConfig.from_dict(cfg_in)
    else:
        raise TypeError(f"run_tad: config must be a TADConfig or dict, got {type(cfg_in).__name__}")
    if overrides:
        cfg = cfg.replace(**overrides)
    return _TADRun(distiller, train_, cfg, clean_labels=_clean_labels_of(clean_labels, train_.images.shape[0]),
                   device=device, checkpoint_dir=checkpoint_dir, resume=resume, quiet=quiet,
                   callback=callback).run()


def tad_partition(train: TrainSet, config: Optional[TADConfig] = None, *, clean_labels=None,
                  device: Union[str, torch.device] = "cpu", checkpoint_dir: Optional[str] = None, resume: bool = True,
                  quiet: bool = True, **overrides: Any) -> TADResult:
    """TAD's rounds of partition and recall alone, without distillation (benchmarks, diagnostics).

    Same arguments and per-round diagnostics as :func:`run_tad`; ``result.synset`` is None and
    ``result.state`` holds the final trusted set and pseudo-labels. The per-class minimum is
    ``config.min_trusted_per_class``."""
    if not isinstance(train, TrainSet):
        raise TypeError(f"train must be a TrainSet, got {type(train).__name__}")
    cfg = config if config is not None else TADConfig()
    if isinstance(cfg, dict):
        cfg = TADConfig.from_dict(cfg)
    if overrides:
        cfg = cfg.replace(**overrides)
    return _TADRun(None, train, cfg, clean_labels=_clean_labels_of(clean_labels, train.images.shape[0]),
                   device=device, checkpoint_dir=checkpoint_dir, resume=resume, quiet=quiet, callback=None).run()


class _TADRun:
    def __init__(self, distiller: Distiller, train: TrainSet, cfg: TADConfig, *, clean_labels, device, checkpoint_dir,
                 resume, quiet, callback):
        self.d, self.train, self.cfg = distiller, train, cfg
        self.clean = clean_labels
        self.device = torch.device(device) if device is not None else (
            distiller.device if distiller is not None else torch.device("cpu"))
        self.ckpt = checkpoint_dir
        self.resume, self.quiet, self.callback = resume, quiet, callback
        self.C = train.num_classes
        self.N = train.images.shape[0]
        counts = torch.bincount(train.labels, minlength=self.C)
        if bool((counts == 0).any()):
            raise ValueError(f"train: class(es) {torch.nonzero(counts == 0).flatten().tolist()} have no sample")
        ipc = int(getattr(distiller.config, "ipc", 1)) if distiller is not None else 1
        self.min_per_class = max(int(cfg.min_trusted_per_class), ipc)
        fingerprint = {"tad_config": cfg.to_dict(), "data": _labels_digest(train), "min_per_class": self.min_per_class,
                       "num_classes": self.C}
        if cfg.schedule == "interleaved" and distiller is not None:
            fingerprint["distill_iterations"] = int(distiller.config.iterations)
        self.store = _RoundStore(checkpoint_dir, fingerprint)
        self.scorer = TrustScorer(cfg, train.in_channels, self.C, train.im_size, train.mean, train.std, self.device)
        self.driver = _DivertedRun(distiller) if distiller is not None else None
        self.diagnostics: List[Dict[str, Any]] = []

    def say(self, msg: str) -> None:
        if not self.quiet:
            print(msg, flush=True)

    # ---- one round ---------------------------------------------------------------------------------
    def round(self, r: int, prev: Optional[TrustState]) -> TrustState:
        cfg, train, C, N = self.cfg, self.train, self.C, self.N
        secs: Dict[str, float] = {}
        cpu0 = time.process_time()
        labels = train.labels if prev is None else prev.effective_labels(train.labels)
        t0 = time.perf_counter()
        if r == 0:
            self.scorer.train(train.images, train.labels, cfg.warmup_epochs, _seed(cfg.seed, 1, 0))
        elif cfg.refine != "none":
            idx = torch.nonzero(prev.trusted).flatten()
            if cfg.refine == "retrain":
                self.scorer.model = self.scorer.new_model(r)
                epochs = cfg.warmup_epochs
            else:
                epochs = cfg.refine_epochs
            if epochs > 0:
                self.scorer.train(train.images[idx], labels[idx], epochs, _seed(cfg.seed, 1, r))
        secs["scorer"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        logits, feats = self.scorer.score(train.images)
        restart = None if prev is None else labels != prev.ema_labels  # relabelled: restart the EMA
        if cfg.trust_statistic == "loss":
            if prev is None or cfg.loss_ema == 0.0:
                stats = sample_stats(logits, labels)
                ema = stats.loss.to(torch.float32).clone()
            else:
                ema = prev.ema.clone()
                stats = sample_stats(logits, labels, ema=ema, momentum=cfg.loss_ema)  # in place
                if bool(restart.any()):
                    ema[restart] = stats.loss[restart].to(ema.dtype)
        else:
            stats = sample_stats(logits, labels)
            value = (1.0 - stats.margin).to(torch.float32)
            if prev is None or cfg.loss_ema == 0.0:
                ema = value.clone()
            else:
                ema = torch.where(restart, value, cfg.loss_ema * prev.ema + (1.0 - cfg.loss_ema) * value)
        pred = stats.prediction
        secs["score"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        init: Union[str, Tuple[torch.Tensor, ...]] = "mean_split"
        if cfg.gmm_warm_start and prev is not None and prev.gmm:
            init = (prev.gmm["weights"].double(), prev.gmm["means"].double(), prev.gmm["variances"].double())
        trusted_gmm, w, fit, n_fallback = partition(
            ema, labels, C, tau=cfg.tau, loss_norm=cfg.loss_norm, gmm_iters=cfg.gmm_iters, gmm_tol=cfg.gmm_tol,
            gmm_reg_covar=cfg.gmm_reg_covar, init=init, min_per_class=self.min_per_class,
            eligible=(pred == labels) if cfg.trust_agreement else None)
        secs["gmm"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        replacement = (prev.replacement.clone() if prev is not None else torch.full((N,), -1, dtype=torch.int64))
        trusted = trusted_gmm.clone()
        weights = w.clone()
        kept = torch.zeros(N, dtype=torch.bool)
        if cfg.trust_update == "grow" and prev is not None:
            kept = prev.trusted & ~trusted_gmm
            trusted |= kept
            weights = torch.where(kept, prev.weights, weights)
        base = trusted.clone()
        rec = None
        recalled = torch.zeros(N, dtype=torch.bool)
        if cfg.recall:
            g = torch.Generator().manual_seed(_seed(cfg.seed, 2, r))
            rec = recall(feats, pred, labels, base, C, covariance=cfg.covariance, shrinkage=cfg.shrinkage,
                         cov_max_samples=cfg.cov_max_samples, maha_quantile=cfg.maha_quantile, kappa=cfg.kappa,
                         require_agreement=cfg.require_agreement, distance_ratio=cfg.recall_ratio, generator=g)
            recalled = rec["reliable"]
            if cfg.trust_agreement:  # samples kept out only by the agreement filter are not recall candidates
                recalled = recalled & ~(w > cfg.tau)
            replacement[recalled] = rec["pseudo"][recalled]
            trusted |= recalled
            weights[recalled] = 1.0
        secs["recall"] = time.perf_counter() - t0
        secs["cpu"] = time.process_time() - cpu0
        new_labels = torch.where(replacement >= 0, replacement, train.labels)

        trusted_per_class = torch.bincount(new_labels[trusted], minlength=C)
        diag: Dict[str, Any] = {
            "round": r, "n": N, "n_trusted_gmm": int(trusted_gmm.sum()), "n_fallback": int(n_fallback),
            "n_kept": int(kept.sum()), "n_untrusted": int((~base).sum()), "n_recalled": int(recalled.sum()),
            "n_relabelled": int((recalled & (new_labels != labels)).sum()), "n_trusted": int(trusted.sum()),
            "trusted_fraction": float(trusted.double().mean()),
            "gmm_shrinkage": (rec["shrinkage"] if rec is not None else None),
            "scorer_agreement": _acc(pred, labels),
            # per class (by the label the distiller sees): a trusted set that covers a hard class only by its
            # easy samples starves that class in the diverted distiller (benchmarks/RESULTS.md)
            "trusted_per_class": trusted_per_class.tolist(),
        }
        if self.clean is not None:
            y = self.clean
            correct_before, correct_after = labels == y, new_labels == y
            untrusted = ~base
            gm = partition_metrics(trusted_gmm, correct_before)
            fm = partition_metrics(trusted, correct_after)
            diag.update({
                "label_accuracy": _acc(labels, y), "label_accuracy_after": _acc(new_labels, y),
                "scorer_accuracy": _acc(pred, y),
                "scorer_noisy_fit": _acc(pred[~correct_before], labels[~correct_before]),
                "gmm_precision": gm["precision"], "gmm_recall": gm["recall"],
                "precision": fm["precision"], "recall": fm["recall"],
                "pseudo_label_accuracy": _acc(new_labels[recalled], y[recalled]),
                "replaced_label_accuracy": _acc(labels[recalled], y[recalled]),
                "candidate_pseudo_accuracy": (_acc(rec["pseudo"][untrusted], y[untrusted]) if rec is not None else None),
                "candidate_label_accuracy": _acc(labels[untrusted], y[untrusted]),
            })
            right = trusted & correct_after
            per_true = torch.bincount(y, minlength=C).clamp_min(1).double()
            per_t = trusted_per_class.clamp_min(1).double()
            hits = torch.bincount(new_labels[right], minlength=C).double()
            # coverage: of all images whose true class is c, the share in T with the right label
            diag["coverage_per_class"] = (hits / per_true).tolist()
            diag["precision_per_class"] = (hits / per_t).tolist()
        t0 = time.perf_counter()
        if cfg.cleanlab:
            probs = torch.softmax(logits.double(), 1)
            try:
                cl = cleanlab_detector(labels, probs)
                diag["cleanlab_n_clean"] = int(cl.sum())
                if self.clean is not None:
                    m = partition_metrics(cl, labels == self.clean)
                    diag["cleanlab_precision"], diag["cleanlab_recall"] = m["precision"], m["recall"]
            except Exception as exc:  # diagnostics never stop a run
                diag["cleanlab_error"] = f"{type(exc).__name__}: {exc}"
            if r == 0 and cfg.cleanlab_folds >= 2:
                oos = kfold_pred_probs(self.scorer, train.images, train.labels, cfg.cleanlab_folds, cfg.seed)
                cl = cleanlab_detector(train.labels, oos)
                diag["cleanlab_oos_n_clean"] = int(cl.sum())
                diag["cleanlab_oos_folds"] = int(cfg.cleanlab_folds)
                if self.clean is not None:
                    m = partition_metrics(cl, train.labels == self.clean)
                    diag["cleanlab_oos_precision"], diag["cleanlab_oos_recall"] = m["precision"], m["recall"]
        secs["cleanlab"] = time.perf_counter() - t0
        secs["total"] = secs["scorer"] + secs["score"] + secs["gmm"] + secs["recall"]
        diag["seconds"] = secs
        gmm = {"weights": fit.weights.float(), "means": fit.means.float(), "variances": fit.variances.float()}
        return TrustState(round=r, trusted=trusted, replacement=replacement, weights=weights, ema=ema,
                          ema_labels=labels.clone(), gmm=gmm), diag

    # ---- the whole run -------------------------------------------------------------------------------
    def run(self) -> TADResult:
        cfg, d, R = self.cfg, self.d, self.cfg.rounds
        done = self.store.latest(R) if self.resume else None
        if not self.resume and self.store.dir and os.path.isdir(self.store.dir):
            for r in range(R):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.store.path(r))
        dist_dir = os.path.join(self.ckpt, "distill") if self.ckpt else None
        iters = int(d.config.iterations) if d is not None else 0
        ends = [iters * (r + 1) // R for r in range(R)]
        first: Optional[TrustState] = None
        state: Optional[TrustState] = None
        reg_installed = False
        fresh_distiller = True
        t_distill = 0.0
        if done is not None:
            state, self.diagnostics = self.store.load(done, self.scorer.model)
            self.say(f"TAD: rounds 0..{done} loaded from {self.store.dir}")
            if cfg.schedule == "interleaved":  # round 0's view feeds the expert/pool and the initialisation
                first = state if done == 0 else self.store.load(0, self.scorer.new_model(0))[0]
        for r in range(R):
            if done is not None and r < done:
                continue
            if done is None or r > done:
                state, diag = self.round(r, state)
                if cfg.schedule == "interleaved":
                    diag["start_iteration"] = ends[r - 1] if r else 0
                    diag["end_iteration"] = ends[r]
                self.diagnostics = self.diagnostics[:r] + [diag]
                self.store.save(r, state, self.scorer.model, self.diagnostics)
                self.say(self._line(diag))
            if r == 0:
                first = state
            if cfg.schedule == "interleaved" and d is not None:
                if cfg.consistency_lambda > 0:
                    d.extra_loss = self._regularizer()
                    reg_installed = True
                t0 = time.perf_counter()
                self._distill(first, state, until=ends[r], fresh=fresh_distiller, ckpt=dist_dir)
                t_distill += time.perf_counter() - t0
                fresh_distiller = False
        if d is None:
            return TADResult(synset=None, rounds=[dict(x) for x in self.diagnostics],
                             summary=self._summary(state, 0.0), state=state, config=cfg)
        if cfg.schedule == "pre":
            if cfg.consistency_lambda > 0:
                d.extra_loss = self._regularizer()
                reg_installed = True
            t0 = time.perf_counter()
            syn = self._distill(state, state, until=iters, fresh=True, ckpt=dist_dir)
            t_distill += time.perf_counter() - t0
        else:
            syn = d.synthetic_set()
        if reg_installed:
            d.extra_loss = None
        summary = self._summary(state, t_distill)
        syn.metadata = dict(syn.metadata or {})
        syn.metadata["tad"] = {"config": cfg.to_dict(), "summary": summary}
        return TADResult(synset=syn, rounds=[dict(x) for x in self.diagnostics], summary=summary, state=state,
                         config=cfg)

    def _regularizer(self) -> ConsistencyRegularizer:
        model = self.scorer.new_model(0)
        model.load_state_dict(self.scorer.model.state_dict())
        return ConsistencyRegularizer(model, self.cfg, self.train.mean, self.train.std, distiller=self.d)

    def _distill(self, first: TrustState, current: TrustState, *, until: int, fresh: bool, ckpt) -> SyntheticSet:
        cfg = self.cfg
        pool = diverted_view(self.train, first, cfg.divert_pool, cfg.pass_weights)
        init = diverted_view(self.train, first, cfg.divert_init, cfg.pass_weights)
        real = diverted_view(self.train, current, cfg.divert_real, cfg.pass_weights)
        if not fresh:
            self.d.update_train(real)
        return self.driver.run(pool, init, real, initialize=fresh, until=until, checkpoint_dir=ckpt,
                               resume=self.resume, callback=self.callback)

    def _summary(self, state: TrustState, t_distill: float) -> Dict[str, Any]:
        last = self.diagnostics[-1] if self.diagnostics else {}
        overhead = sum(float(x.get("seconds", {}).get("total", 0.0)) for x in self.diagnostics)
        cl = sum(float(x.get("seconds", {}).get("cleanlab", 0.0)) for x in self.diagnostics)
        s = {"rounds": self.cfg.rounds, "schedule": self.cfg.schedule, "n_trusted": int(state.trusted.sum()),
             "n_pseudo_labelled": int((state.replacement >= 0).sum()), "tad_seconds": overhead,
             "cleanlab_seconds": cl, "distill_seconds": t_distill}
        for k in ("precision", "recall", "label_accuracy_after"):
            if last.get(k) is not None:
                s[k] = last[k]
        return s

    @staticmethod
    def _line(d: Dict[str, Any]) -> str:
        s = (f"TAD round {d['round']}: trusted {d['n_trusted_gmm']} (GMM) + {d['n_recalled']} recalled = "
             f"{d['n_trusted']}/{d['n']}")
        if d.get("precision") is not None:
            s += f"; precision {100 * d['precision']:.1f}% recall {100 * d['recall']:.1f}%"
        if d.get("pseudo_label_accuracy") is not None:
            s += f"; pseudo-labels {100 * d['pseudo_label_accuracy']:.1f}% correct"
        s += f" ({d['seconds']['total']:.1f} s)"
        return s
