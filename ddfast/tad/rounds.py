"""One TAD round (score, partition, recall, diagnostics), the trust state it produces, its checkpoints, and the
diverted views a distiller sees.

A round ``r`` (TAD, Wu et al., arXiv 2502.05027: one iteration of the dual loop):

1. train (round 0: ``scorer.warmup_epochs`` on the noisy labels) or refine (later rounds: on the trusted set
   with its pseudo-labels) the scoring network f;
2. score every sample: logits and penultimate features of f; the trust statistic (loss or ``1 - margin``) and
   its EMA over rounds;
3. outer loop: the class-wise GMM partition (:func:`ddfast.tad.partition.partition`), united with the earlier
   trusted set when ``trust_update="grow"``;
4. inner loop: recall of reliable untrusted samples with pseudo-labels (:func:`ddfast.tad.partition.recall`);
5. diagnostics (per-class counts; precision, recall and coverage when the clean labels are known; cleanlab
   side by side).
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from ..distill.base import TrainSet
from ..io import load_tensors, save_tensors
from ..noise import estimate_noise_rate, estimate_transition, posterior_probabilities, transition_matrix
from ..ops import sample_stats
from .config import TADConfig
from .partition import cleanlab_detector, partition, partition_metrics, recall
from .scorer import TrustScorer, kfold_pred_probs, tad_seed

__all__ = ["TrustState", "RoundStore", "run_round", "diverted_view"]

_STATE_FORMAT = "ddfast.TADRound/1"

#: the string values of ``divert_pool`` / ``diverted_view``'s ``divert`` besides True / False ("auto" is resolved
#: before a view is built, :func:`ddfast.tad.resolve_divert_pool`)
DIVERT_VIEWS = ("relabel", "corrected", "posterior", "posterior_soft")


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
        transition: ``float64 [C, C]`` estimate of ``P(given label j | true class i)`` from this round's
            scorer (:func:`ddfast.noise.estimate_transition` on the given labels); None in checkpoints written
            before it existed.
        noise_rate: the estimated share of wrong given labels, ``1 - sum_i prior_i T[i, i]`` with the scorer's
            predicted class shares as the prior (:func:`ddfast.noise.estimate_noise_rate`); it decides
            ``divert_pool="auto"``. None in checkpoints written before it existed.
        posterior: ``int64 [N]`` -- every sample's most probable true class given its image and its *given* label
            under ``transition``, with the scorer's probabilities as the image's evidence, class-balanced to the
            given labels' shares when ``TADConfig.posterior_balance`` (:func:`ddfast.noise.posterior_labels`); what ``divert_pool="posterior"`` trains on. None in
            checkpoints written before it existed.
        posterior_probs: ``float32 [N, C]`` -- the distribution whose argmax is ``posterior``
            (:func:`ddfast.noise.posterior_probabilities`); the soft labels of ``divert_real="posterior_soft"``.
            None in checkpoints written before it existed.
    """

    round: int
    trusted: torch.Tensor
    replacement: torch.Tensor
    weights: torch.Tensor
    ema: torch.Tensor
    ema_labels: torch.Tensor
    gmm: Dict[str, torch.Tensor] = field(default_factory=dict)
    transition: Optional[torch.Tensor] = None
    noise_rate: Optional[float] = None
    posterior: Optional[torch.Tensor] = None
    posterior_probs: Optional[torch.Tensor] = None

    def effective_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """``int64 [N]``: ``labels`` with the pseudo-labels applied."""
        return torch.where(self.replacement >= 0, self.replacement, labels)

    def min_class_share(self, labels: torch.Tensor, num_classes: int) -> float:
        """The smallest share of a class the trusted set keeps [ddfast]: ``min_c |T_c| / |{i : y~_i = c}|``
        over the classes with at least one given label, ``T_c`` the trusted samples whose (pseudo-)label is
        ``c``. Label-free (given labels only). Under pair-flip noise the trusted set nearly drops the class whose
        images carry its partner's labels (Fashion-MNIST asym 0.4: T-shirt 0.12), and at 80 % symmetric noise
        the hardest class (Shirt 0.02); at 40 % symmetric or instance-dependent noise every class keeps >= 0.30
        (benchmarks/RESULTS.md). ``labels``: ``int64 [N]`` given labels."""
        labels = labels.cpu()
        given = torch.bincount(labels, minlength=num_classes).double()
        kept = torch.bincount(self.effective_labels(labels)[self.trusted], minlength=num_classes).double()
        present = given > 0
        return float((kept[present] / given[present]).min()) if bool(present.any()) else 1.0


@dataclass
class RoundContext:
    """What every round of one TAD run shares: the config, the noisy training set, the scoring network, the
    clean labels (diagnostics only; ``None`` when unknown) and the per-class minimum of trusted samples."""

    cfg: TADConfig
    train: TrainSet
    scorer: TrustScorer
    clean: Optional[torch.Tensor]
    min_per_class: int

    @property
    def num_classes(self) -> int:
        return self.train.num_classes


# ----------------------------------------------------------------------------------------------------------
# the steps of a round
# ----------------------------------------------------------------------------------------------------------
def _noise_estimate(ctx: RoundContext, probs: torch.Tensor, pred: torch.Tensor) -> Tuple[torch.Tensor, float]:
    """``(transition float64 [C, C], noise rate)`` of the given labels from f's probabilities ``[N, C]`` and
    predictions ``[N]`` (:func:`ddfast.noise.estimate_transition`, :func:`ddfast.noise.estimate_noise_rate` with
    f's predicted class shares as the prior)."""
    transition = estimate_transition(probs, ctx.train.labels, ctx.num_classes, ctx.cfg.transition_quantile)
    prior = torch.bincount(pred.long().cpu(), minlength=ctx.num_classes).double() / max(1, pred.numel())
    return transition, estimate_noise_rate(transition, prior)


def _warmup_noise_rate(ctx: RoundContext) -> float:
    """The noise rate estimated from f as it stands (as in :func:`run_round`)."""
    logits, _ = ctx.scorer.score(ctx.train.images)
    return _noise_estimate(ctx, torch.softmax(logits.double(), 1), logits.argmax(1))[1]


def _train_scorer(ctx: RoundContext, r: int, prev: Optional[TrustState], labels: torch.Tensor) -> Dict[str, Any]:
    """Trains (round 0) or refines f; returns diagnostics (round 0: the warm-up's noise-rate estimate and the
    epochs f trained, ``ScorerConfig.high_noise_epochs``)."""
    sc, train, cfg = ctx.cfg.scorer, ctx.train, ctx.cfg
    if r == 0:
        ctx.scorer.train(train.images, train.labels, sc.warmup_epochs, tad_seed(cfg.seed, 1, 0))
        if sc.high_noise_epochs <= sc.warmup_epochs:
            return {"scorer_epochs": float(sc.warmup_epochs)}
        rate = _warmup_noise_rate(ctx)
        out = {"warmup_noise_rate_estimate": rate, "scorer_epochs": float(sc.warmup_epochs)}
        if rate > cfg.divert_noise_rate:  # most labels wrong: the early-learning phase lasts longer
            ctx.scorer.train(train.images, train.labels, sc.high_noise_epochs - sc.warmup_epochs,
                             tad_seed(cfg.seed, 1, 0, 1))
            out["scorer_epochs"] = float(sc.high_noise_epochs)
        return out
    elif sc.refine != "none":
        idx = torch.nonzero(prev.trusted).flatten()
        if sc.refine == "retrain":
            ctx.scorer.model = ctx.scorer.new_model(r)
            epochs = sc.warmup_epochs
        else:
            epochs = sc.refine_epochs
        if epochs > 0:
            ctx.scorer.train(train.images[idx], labels[idx], epochs, tad_seed(ctx.cfg.seed, 1, r))
    return {}


def _trust_statistic(cfg: TADConfig, logits: torch.Tensor, labels: torch.Tensor, prev: Optional[TrustState]):
    """``(ema float32 [N], sample_stats)``: this round's statistic, smoothed over rounds (a relabelled sample
    restarts its EMA)."""
    restart = None if prev is None else labels != prev.ema_labels
    fresh = prev is None or cfg.loss_ema == 0.0
    if cfg.trust_statistic == "loss":
        if fresh:
            stats = sample_stats(logits, labels)
            return stats.loss.to(torch.float32).clone(), stats
        ema = prev.ema.clone()
        stats = sample_stats(logits, labels, ema=ema, momentum=cfg.loss_ema)  # in place
        if bool(restart.any()):
            ema[restart] = stats.loss[restart].to(ema.dtype)
        return ema, stats
    stats = sample_stats(logits, labels)
    value = (1.0 - stats.margin).to(torch.float32)
    if fresh:
        return value.clone(), stats
    return torch.where(restart, value, cfg.loss_ema * prev.ema + (1.0 - cfg.loss_ema) * value), stats


def _partition(ctx: RoundContext, ema, labels, pred, prev: Optional[TrustState]):
    cfg = ctx.cfg
    init: Union[str, Tuple[torch.Tensor, ...]] = "mean_split"
    if cfg.gmm_warm_start and prev is not None and prev.gmm:
        init = (prev.gmm["weights"].double(), prev.gmm["means"].double(), prev.gmm["variances"].double())
    return partition(ema, labels, ctx.num_classes, tau=cfg.tau, loss_norm=cfg.loss_norm, gmm_iters=cfg.gmm_iters,
                     gmm_tol=cfg.gmm_tol, gmm_reg_covar=cfg.gmm_reg_covar, init=init,
                     min_per_class=ctx.min_per_class, eligible=(pred == labels) if cfg.trust_agreement else None)


@dataclass
class _Split:
    """The trusted set of a round and how it came about (all ``[N]``)."""

    trusted_gmm: torch.Tensor
    trusted: torch.Tensor
    weights: torch.Tensor
    replacement: torch.Tensor
    kept: torch.Tensor
    base: torch.Tensor
    recalled: torch.Tensor
    rec: Optional[Dict[str, Any]]


def _recall(ctx: RoundContext, r: int, feats, pred, labels, trusted_gmm, w, prev: Optional[TrustState]) -> _Split:
    cfg, N = ctx.cfg, labels.shape[0]
    replacement = prev.replacement.clone() if prev is not None else torch.full((N,), -1, dtype=torch.int64)
    trusted, weights = trusted_gmm.clone(), w.clone()
    kept = torch.zeros(N, dtype=torch.bool)
    if cfg.trust_update == "grow" and prev is not None:
        kept = prev.trusted & ~trusted_gmm
        trusted |= kept
        weights = torch.where(kept, prev.weights, weights)
    base = trusted.clone()
    rec = None
    recalled = torch.zeros(N, dtype=torch.bool)
    if cfg.recall:
        g = torch.Generator().manual_seed(tad_seed(cfg.seed, 2, r))
        rec = recall(feats, pred, labels, base, ctx.num_classes, covariance=cfg.covariance, shrinkage=cfg.shrinkage,
                     cov_max_samples=cfg.cov_max_samples, maha_quantile=cfg.maha_quantile, kappa=cfg.kappa,
                     require_agreement=cfg.require_agreement, distance_ratio=cfg.recall_ratio, generator=g)
        recalled = rec["reliable"]
        if cfg.trust_agreement:  # samples kept out only by the agreement filter are not recall candidates
            recalled = recalled & ~(w > cfg.tau)
        replacement[recalled] = rec["pseudo"][recalled]
        trusted |= recalled
        weights[recalled] = 1.0
    return _Split(trusted_gmm, trusted, weights, replacement, kept, base, recalled, rec)


def _acc(a: torch.Tensor, b: torch.Tensor) -> Optional[float]:
    return float((a == b).double().mean()) if a.numel() else None


def _diagnostics(ctx: RoundContext, r: int, sp: _Split, labels, new_labels, pred, n_fallback: int) -> Dict[str, Any]:
    C, N = ctx.num_classes, labels.shape[0]
    trusted_per_class = torch.bincount(new_labels[sp.trusted], minlength=C)
    diag: Dict[str, Any] = {
        "round": r, "n": N, "n_trusted_gmm": int(sp.trusted_gmm.sum()), "n_fallback": int(n_fallback),
        "n_kept": int(sp.kept.sum()), "n_untrusted": int((~sp.base).sum()), "n_recalled": int(sp.recalled.sum()),
        "n_relabelled": int((sp.recalled & (new_labels != labels)).sum()), "n_trusted": int(sp.trusted.sum()),
        "trusted_fraction": float(sp.trusted.double().mean()),
        "gmm_shrinkage": (sp.rec["shrinkage"] if sp.rec is not None else None),
        "scorer_agreement": _acc(pred, labels),
        # per class (by the label the distiller sees): a trusted set that covers a hard class only by its
        # easy samples starves that class in the diverted distiller (benchmarks/RESULTS.md)
        "trusted_per_class": trusted_per_class.tolist(),
    }
    if ctx.clean is not None:
        diag.update(_clean_diagnostics(ctx, sp, labels, new_labels, pred, trusted_per_class))
    return diag


def _clean_diagnostics(ctx: RoundContext, sp: _Split, labels, new_labels, pred, trusted_per_class) -> Dict[str, Any]:
    """Precision / recall / coverage of the trusted set against the true labels (never used by TAD itself)."""
    y, C = ctx.clean, ctx.num_classes
    correct_before, correct_after = labels == y, new_labels == y
    untrusted = ~sp.base
    gm = partition_metrics(sp.trusted_gmm, correct_before)
    fm = partition_metrics(sp.trusted, correct_after)
    right = sp.trusted & correct_after
    per_true = torch.bincount(y, minlength=C).clamp_min(1).double()
    per_t = trusted_per_class.clamp_min(1).double()
    hits = torch.bincount(new_labels[right], minlength=C).double()
    rec, recalled = sp.rec, sp.recalled
    return {
        "label_accuracy": _acc(labels, y), "label_accuracy_after": _acc(new_labels, y),
        "scorer_accuracy": _acc(pred, y),
        "scorer_noisy_fit": _acc(pred[~correct_before], labels[~correct_before]),
        "gmm_precision": gm["precision"], "gmm_recall": gm["recall"],
        "precision": fm["precision"], "recall": fm["recall"],
        "pseudo_label_accuracy": _acc(new_labels[recalled], y[recalled]),
        "replaced_label_accuracy": _acc(labels[recalled], y[recalled]),
        "candidate_pseudo_accuracy": (_acc(rec["pseudo"][untrusted], y[untrusted]) if rec is not None else None),
        "candidate_label_accuracy": _acc(labels[untrusted], y[untrusted]),
        # coverage: of all images whose true class is c, the share in T with the right label
        "coverage_per_class": (hits / per_true).tolist(),
        "precision_per_class": (hits / per_t).tolist(),
    }


def _cleanlab_diagnostics(ctx: RoundContext, r: int, logits: torch.Tensor, labels: torch.Tensor) -> Dict[str, Any]:
    """cleanlab's confident learning on the same predictions (and, at round 0 with ``cleanlab_folds``, on
    K-fold out-of-sample ones), scored against the clean labels when known. Diagnostics never stop a run."""
    cfg, train, out = ctx.cfg, ctx.train, {}
    try:
        cl = cleanlab_detector(labels, torch.softmax(logits.double(), 1))
        out["cleanlab_n_clean"] = int(cl.sum())
        if ctx.clean is not None:
            m = partition_metrics(cl, labels == ctx.clean)
            out["cleanlab_precision"], out["cleanlab_recall"] = m["precision"], m["recall"]
    except Exception as exc:  # noqa: BLE001 - a diagnostic, reported in the round's record
        out["cleanlab_error"] = f"{type(exc).__name__}: {exc}"
    if r == 0 and cfg.cleanlab_folds >= 2:
        oos = kfold_pred_probs(ctx.scorer, train.images, train.labels, cfg.cleanlab_folds, cfg.seed)
        cl = cleanlab_detector(train.labels, oos)
        out["cleanlab_oos_n_clean"] = int(cl.sum())
        out["cleanlab_oos_folds"] = int(cfg.cleanlab_folds)
        if ctx.clean is not None:
            m = partition_metrics(cl, train.labels == ctx.clean)
            out["cleanlab_oos_precision"], out["cleanlab_oos_recall"] = m["precision"], m["recall"]
    return out


def run_round(ctx: RoundContext, r: int, prev: Optional[TrustState]) -> Tuple[TrustState, Dict[str, Any]]:
    """Round ``r`` after ``prev`` (None for round 0): ``(the new TrustState, the round's diagnostics)``
    (schema in :func:`ddfast.tad.run_tad`)."""
    cfg, train = ctx.cfg, ctx.train
    secs: Dict[str, float] = {}
    cpu0 = time.process_time()
    labels = train.labels if prev is None else prev.effective_labels(train.labels)
    t0 = time.perf_counter()
    scorer_diag = _train_scorer(ctx, r, prev, labels)
    secs["scorer"], t0 = time.perf_counter() - t0, time.perf_counter()
    logits, feats = ctx.scorer.score(train.images)
    ema, stats = _trust_statistic(cfg, logits, labels, prev)
    pred = stats.prediction
    secs["score"], t0 = time.perf_counter() - t0, time.perf_counter()
    trusted_gmm, w, fit, n_fallback = _partition(ctx, ema, labels, pred, prev)
    secs["gmm"], t0 = time.perf_counter() - t0, time.perf_counter()
    sp = _recall(ctx, r, feats, pred, labels, trusted_gmm, w, prev)
    secs["recall"] = time.perf_counter() - t0
    secs["cpu"] = time.process_time() - cpu0
    new_labels = torch.where(sp.replacement >= 0, sp.replacement, train.labels)
    diag = _diagnostics(ctx, r, sp, labels, new_labels, pred, n_fallback)
    diag.update(scorer_diag)
    t0 = time.perf_counter()
    if cfg.cleanlab:
        diag.update(_cleanlab_diagnostics(ctx, r, logits, labels))
    secs["cleanlab"] = time.perf_counter() - t0
    secs["total"] = secs["scorer"] + secs["score"] + secs["gmm"] + secs["recall"]
    diag["seconds"] = secs
    probs = torch.softmax(logits.double(), 1)
    transition, noise_rate = _noise_estimate(ctx, probs, pred)
    shares = None
    if cfg.posterior_balance:  # keep the given labels' class shares (TADConfig.posterior_balance)
        shares = torch.bincount(train.labels.cpu(), minlength=ctx.num_classes).double() / train.labels.numel()
    posterior_probs = posterior_probabilities(probs, train.labels, transition, class_prior=shares)
    posterior = posterior_probs.argmax(1)
    diag["n_posterior_changed"] = int((posterior != train.labels.cpu()).sum())
    diag["transition_diagonal"] = [round(float(v), 4) for v in transition.diagonal()]
    diag["noise_rate_estimate"] = noise_rate
    if ctx.clean is not None:  # how far the estimate is from the realised noise (diagnostic only)
        true_t = transition_matrix(ctx.clean, train.labels, ctx.num_classes)
        diag["transition_error"] = float((transition - true_t).abs().sum(1).max())
        diag["noise_rate_realised"] = float((train.labels.cpu() != ctx.clean).double().mean())
        diag["posterior_label_accuracy"] = float((posterior == ctx.clean).double().mean())
    gmm = {"weights": fit.weights.float(), "means": fit.means.float(), "variances": fit.variances.float()}
    state = TrustState(round=r, trusted=sp.trusted, replacement=sp.replacement, weights=sp.weights, ema=ema,
                       ema_labels=labels.clone(), gmm=gmm, transition=transition, noise_rate=noise_rate,
                       posterior=posterior, posterior_probs=posterior_probs.float())
    return state, diag


# ----------------------------------------------------------------------------------------------------------
# round checkpoints
# ----------------------------------------------------------------------------------------------------------
class RoundStore:
    """Per-round TAD checkpoints: ``<dir>/tad/round_<r>.safetensors`` (tensors + JSON metadata, atomic)."""

    def __init__(self, checkpoint_dir: Optional[str], fingerprint: Dict[str, Any]):
        self.dir = os.path.join(checkpoint_dir, "tad") if checkpoint_dir else None
        self.fingerprint = fingerprint

    def path(self, r: int) -> str:
        return os.path.join(self.dir, f"round_{r:03d}.safetensors")

    def save(self, r: int, state: TrustState, model: nn.Module, diagnostics: List[Dict[str, Any]]) -> None:
        if self.dir is None:
            return
        tensors = {"trusted": state.trusted.to(torch.uint8), "replacement": state.replacement,
                   "weights": state.weights, "ema": state.ema, "ema_labels": state.ema_labels}
        if state.transition is not None:
            tensors["transition"] = state.transition
        if state.noise_rate is not None:
            tensors["noise_rate"] = torch.tensor(float(state.noise_rate), dtype=torch.float64)
        if state.posterior is not None:
            tensors["posterior"] = state.posterior
        if state.posterior_probs is not None:
            tensors["posterior_probs"] = state.posterior_probs
        for k, v in state.gmm.items():
            tensors[f"gmm.{k}"] = v
        for k, v in model.state_dict().items():
            tensors[f"scorer.{k}"] = v.detach().cpu()
        meta = {"format": _STATE_FORMAT, "round": r, "fingerprint": self.fingerprint, "diagnostics": diagnostics}
        save_tensors(tensors, self.path(r), meta=meta)

    def latest(self, rounds: int) -> Optional[int]:
        """The last of the consecutive finished rounds ``0..k`` on disk, or None."""
        if self.dir is None:
            return None
        done = None
        for r in range(rounds):
            if not os.path.exists(self.path(r)):
                break
            done = r
        return done

    def clear(self, rounds: int) -> None:
        if self.dir is None or not os.path.isdir(self.dir):
            return
        for r in range(rounds):
            if os.path.exists(self.path(r)):
                os.remove(self.path(r))

    def load(self, r: int, model: nn.Module) -> Tuple[TrustState, List[Dict[str, Any]]]:
        """Round ``r``'s state and diagnostics; loads the scorer's weights into ``model``.

        Raises:
            ValueError: not a TAD round checkpoint, or one written by another TAD run (fingerprint)."""
        tensors, meta = load_tensors(self.path(r))
        if not isinstance(meta, dict) or meta.get("format") != _STATE_FORMAT:
            raise ValueError(f"{self.path(r)}: not a TAD round checkpoint")
        if meta.get("fingerprint") != self.fingerprint:
            old, new = meta.get("fingerprint", {}), self.fingerprint
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise ValueError(f"{self.path(r)} was written by another TAD run (differs in {diff}); use a new "
                             "checkpoint directory or the same options")
        model.load_state_dict({k[len("scorer."):]: v for k, v in tensors.items() if k.startswith("scorer.")})
        gmm = {k[len("gmm."):]: v for k, v in tensors.items() if k.startswith("gmm.")}
        state = TrustState(round=r, trusted=tensors["trusted"].bool(), replacement=tensors["replacement"].long(),
                           weights=tensors["weights"].float(), ema=tensors["ema"].float(),
                           ema_labels=tensors["ema_labels"].long(), gmm=gmm,
                           transition=tensors["transition"].double() if "transition" in tensors else None,
                           noise_rate=float(tensors["noise_rate"]) if "noise_rate" in tensors else None,
                           posterior=tensors["posterior"].long() if "posterior" in tensors else None,
                           posterior_probs=(tensors["posterior_probs"].float() if "posterior_probs" in tensors
                                            else None))
        return state, list(meta.get("diagnostics", []))


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
    - ``divert="corrected"`` and a state: every sample with its given label and ``transition =
      state.transition`` -- networks trained on it use forward loss correction;
    - ``divert="posterior"`` and a state: every sample (no mask, no weights), each with its most probable true
      class given its image and given label (``state.posterior``) as ``replacement_labels`` where that differs
      from the given label;
    - ``divert="posterior_soft"`` and a state: the ``"posterior"`` view plus ``soft_labels =
      state.posterior_probs`` (the whole posterior distribution: RCIG's outer cross-entropy targets, DANCE's
      posterior-weighted real batches);
    - otherwise the plain noisy set (trust fields cleared).

    Raises ``ValueError`` for any other ``divert``, or ``"corrected"`` / ``"posterior"`` / ``"posterior_soft"``
    with a state that has no transition / posterior labels / posterior distribution (a checkpoint of an older
    ddfast)."""
    if not (isinstance(divert, bool) or divert in DIVERT_VIEWS):
        raise ValueError(f"divert must be True, False or one of {DIVERT_VIEWS}, got {divert!r}")
    plain = dict(weights=None, trusted_mask=None, replacement_labels=None, transition=None, soft_labels=None)
    if not divert or state is None:
        return dataclasses.replace(train, **plain)
    if divert == "relabel":
        return dataclasses.replace(train, **{**plain, "replacement_labels": state.replacement.clone()})
    if divert == "corrected":
        if state.transition is None:
            raise ValueError("divert='corrected' needs the round's noise transition, which this TAD checkpoint "
                             "(written by an older ddfast) lacks; rerun TAD in a new checkpoint directory")
        return dataclasses.replace(train, **{**plain, "transition": state.transition.clone()})
    if divert in ("posterior", "posterior_soft"):
        if state.posterior is None or (divert == "posterior_soft" and state.posterior_probs is None):
            raise ValueError(f"divert={divert!r} needs the round's posterior labels and distribution, which this "
                             "TAD checkpoint (written by an older ddfast) lacks; rerun TAD in a new checkpoint "
                             "directory")
        changed = state.posterior != train.labels.cpu()
        soft = state.posterior_probs.clone() if divert == "posterior_soft" else None
        return dataclasses.replace(train, **{**plain, "replacement_labels": torch.where(
            changed, state.posterior, torch.full_like(state.posterior, -1)), "soft_labels": soft})
    return dataclasses.replace(train, trusted_mask=state.trusted.clone(), replacement_labels=state.replacement.clone(),
                               weights=state.weights.clone() if pass_weights else None, transition=None,
                               soft_labels=None)
