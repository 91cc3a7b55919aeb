"""A whole TAD run: the rounds (with resume), the diverted distillation, and the result."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Union

import torch

from ..distill.base import Distiller, DistillViews, SyntheticSet, TrainSet, labels_digest
from ..hashing import tensor_digest
from .config import TADConfig
from .consistency import ConsistencyRegularizer
from .rounds import RoundContext, RoundStore, TrustState, diverted_view, run_round
from .scorer import TrustScorer

__all__ = ["TADResult", "run_tad", "tad_partition", "resolve_divert_pool", "resolve_divert_real"]


def _posterior_by_share(state: Optional[TrustState], labels: Optional[torch.Tensor], min_class_share: float) -> bool:
    if state is None or labels is None or min_class_share <= 0:
        return False
    if state.posterior is None:
        raise ValueError("divert='auto' needs the round's posterior labels, which this TAD checkpoint (written by "
                         "an older ddfast) lacks; rerun TAD in a new checkpoint directory")
    labels = labels.cpu()
    n_classes = int(torch.maximum(labels.max(), state.effective_labels(labels).max())) + 1
    if state.min_class_share(labels, n_classes) >= min_class_share:
        return False
    # ... and only when the posterior labels keep every class better (a scorer trained on a few hundred images
    # can leave a class without any posterior label)
    given = torch.bincount(labels, minlength=n_classes).double()
    post = torch.bincount(state.posterior.cpu(), minlength=n_classes)[:n_classes].double()
    present = given > 0
    return float((post[present] / given[present]).min()) >= min_class_share


def resolve_divert_pool(divert: Union[bool, str], distiller: Optional[Distiller], state: Optional[TrustState],
                        noise_rate_threshold: float = 0.5, *, labels: Optional[torch.Tensor] = None,
                        min_class_share: float = 0.0) -> Union[bool, str]:
    """What ``TADConfig.divert_pool`` means for this distiller and trust state [ddfast]: anything but
    ``"auto"`` as given; ``"auto"`` gives ``"posterior"`` when the trusted set keeps less than
    ``min_class_share`` of some class (:meth:`TrustState.min_class_share` on the given ``labels``; off when
    ``labels`` is None or ``min_class_share`` is 0) while the posterior labels keep at least that share of every
    class; else ``True`` for distillers that train a model pool and, for those whose class sets
    ``divert_pool_by_noise_rate`` (DATM: expert trajectories), ``True`` only when
    ``state.noise_rate > noise_rate_threshold`` (most given labels wrong), else ``False``.

    Raises:
        ValueError: ``"auto"`` with a state that carries no noise-rate estimate (for such a distiller) or no
            posterior labels (when the share rule is on): a TAD checkpoint from an older ddfast."""
    if divert != "auto":
        return divert
    if _posterior_by_share(state, labels, min_class_share):
        return "posterior"
    if distiller is None or not getattr(distiller, "divert_pool_by_noise_rate", False) or state is None:
        return True
    if state.noise_rate is None:
        raise ValueError("divert_pool='auto' needs the round's noise-rate estimate, which this TAD checkpoint "
                         "(written by an older ddfast) lacks; rerun TAD in a new checkpoint directory")
    return bool(state.noise_rate > noise_rate_threshold)


def resolve_divert_real(divert: Union[bool, str], state: Optional[TrustState], labels: Optional[torch.Tensor],
                        min_class_share: float) -> Union[bool, str]:
    """What ``TADConfig.divert_real`` means for this trust state [ddfast]: anything but ``"auto"`` as given;
    ``"auto"`` gives ``"posterior"`` when the trusted set keeps less than ``min_class_share`` of some class
    (:meth:`TrustState.min_class_share`) while the posterior labels keep at least that share of every class,
    else ``True`` (the trusted view).

    Raises:
        ValueError: ``"auto"`` with a state that carries no posterior labels (a TAD checkpoint from an older
            ddfast)."""
    if divert != "auto":
        return divert
    return "posterior" if _posterior_by_share(state, labels, min_class_share) else True


@dataclass
class TADResult:
    """What :func:`run_tad` returns.

    Attributes:
        synset: the distilled :class:`SyntheticSet` (``metadata["tad"]`` holds the config and summary); None
            for :func:`tad_partition`.
        rounds: per-round diagnostics (JSON-able dicts; schema in :func:`run_tad`).
        summary: JSON-able totals (final |T|, precision, recall, TAD overhead seconds, ...).
        state: the final :class:`~ddfast.tad.rounds.TrustState` (trusted mask, pseudo-labels, weights).
        config: the :class:`TADConfig` used.
    """

    synset: Optional[SyntheticSet]
    rounds: List[Dict[str, Any]]
    summary: Dict[str, Any]
    state: TrustState
    config: TADConfig


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


def _config_of(config: Union[TADConfig, Dict[str, Any], None]) -> TADConfig:
    if config is None:
        return TADConfig()
    if isinstance(config, TADConfig):
        return config
    if isinstance(config, dict):
        return TADConfig.from_dict(config)
    raise TypeError(f"run_tad: config must be a TADConfig or a dict of its fields, got {type(config).__name__}")


def run_tad(distiller: Distiller, train: TrainSet, config: Union[TADConfig, Dict[str, Any], None] = None, *,
            clean_labels=None, device: Optional[Union[str, torch.device]] = None,
            checkpoint_dir: Optional[str] = None, resume: bool = True, quiet: bool = False,
            callback: Optional[Callable[[Distiller, Dict[str, float]], None]] = None) -> TADResult:
    """Runs ``distiller`` under trust-aware diversion (TAD, Wu et al., arXiv 2502.05027; :mod:`ddfast.tad`).

    Args:
        distiller: a :class:`~ddfast.distill.base.Distiller` (its device, cache and config are used; build one
            with :func:`ddfast.distill.make_distiller`).
        train: the noisy :class:`TrainSet` (``labels`` are the given labels; trust fields it carries are
            ignored and replaced).
        config: :class:`TADConfig`, a dict of its fields, or None (defaults).
        clean_labels: ``int64 [N]`` true labels, or the :class:`ddfast.noise.NoisyLabels` (its ``clean_labels``),
            for the precision/recall diagnostics; never used by TAD itself.
        device: where f runs (default: the distiller's device).
        checkpoint_dir: per-round TAD state in ``<dir>/tad/``, the distiller's checkpoint in ``<dir>/distill/``.
            With ``resume``, finished rounds are loaded, not recomputed, and the distiller resumes from its
            checkpoint: the result equals an uninterrupted run's.
        quiet: no progress lines.
        callback: passed to ``Distiller.run`` (called after every distillation step).

    Returns:
        :class:`TADResult`; its ``summary`` also holds ``divert_pool`` (the config's value resolved, see
        :func:`resolve_divert_pool`; ``"n/a"`` for a distiller whose ``trains_on_real_images`` is False),
        ``divert_real`` (resolved, :func:`resolve_divert_real`), ``min_class_share`` (the final trusted set's,
        :meth:`~ddfast.tad.rounds.TrustState.min_class_share`, which decides both ``"auto"`` rules) and
        ``noise_rate_estimate``. Each round dict holds (``None`` where not known):
        ``round``, ``n``, ``n_trusted_gmm`` (GMM partition), ``n_fallback`` (added by the per-class minimum),
        ``n_kept`` (trusted earlier, rejected by this round's GMM, kept by ``trust_update="grow"``),
        ``n_untrusted`` (the recall candidates), ``n_recalled``, ``n_relabelled`` (recalled with a label different
        from their current one), ``n_trusted`` (after recall), ``trusted_fraction``, ``gmm_shrinkage`` (the
        Ledoit-Wolf intensity used), ``scorer_agreement`` (f's predictions == current labels),
        ``trusted_per_class``, ``transition_diagonal`` (the estimated noise transition's diagonal),
        ``noise_rate_estimate`` (the estimated share of wrong given labels, which decides
        ``divert_pool="auto"``), ``n_posterior_changed`` (samples whose posterior label, ``divert_pool="posterior"``,
        differs from the given one), at round 0 ``scorer_epochs`` (epochs f trained) and, with
        ``scorer.high_noise_epochs`` on, ``warmup_noise_rate_estimate`` (the estimate after the warm-up that
        decides them), ``seconds`` (dict of wall seconds: scorer, score, gmm, recall, cleanlab, total --
        total excludes cleanlab -- and cpu: the process CPU seconds of scorer..recall, a load-independent cost
        measure on a shared machine) and, with clean labels: ``label_accuracy`` (current labels before the
        round's recall vs truth), ``label_accuracy_after``, ``scorer_accuracy`` (f's predictions vs truth),
        ``noise_rate_realised``, ``posterior_label_accuracy`` (the posterior labels vs truth), ``transition_error`` (largest L1 row error of the estimated transition),
        ``scorer_noisy_fit`` (share of the wrongly labelled samples whose wrong label f predicts: memorisation;
        low = f's predictions are near out-of-sample), ``gmm_precision``/``gmm_recall`` (the GMM partition as a
        detector of correctly-labelled samples), ``precision``/``recall`` (the trusted set after recall, same
        definition on the labels after recall), ``pseudo_label_accuracy`` (recalled samples' pseudo-labels vs
        truth), ``replaced_label_accuracy`` (the labels those pseudo-labels replace), ``candidate_pseudo_accuracy``
        / ``candidate_label_accuracy`` (the same on every untrusted sample), ``coverage_per_class`` /
        ``precision_per_class``, ``cleanlab_n_clean``, ``cleanlab_precision``/``cleanlab_recall`` (cleanlab on the
        same in-sample predictions and labels as the GMM), at round 0 with ``cleanlab_folds``: ``cleanlab_oos_*``;
        with the interleaved schedule ``start_iteration``/``end_iteration``.

    Raises:
        TypeError: wrong argument types. ValueError: bad config fields (named), clean labels of the wrong
        shape, a checkpoint directory written by another TAD run, a class without any sample.
    """
    if not isinstance(distiller, Distiller):
        raise TypeError(f"run_tad: distiller must be a Distiller (ddfast.distill.make_distiller), got "
                        f"{type(distiller).__name__}")
    return _TADRun(distiller, train, _config_of(config), clean_labels=clean_labels, device=device,
                   checkpoint_dir=checkpoint_dir, resume=resume, quiet=quiet, callback=callback).run()


def tad_partition(train: TrainSet, config: Union[TADConfig, Dict[str, Any], None] = None, *, clean_labels=None,
                  device: Union[str, torch.device] = "cpu", checkpoint_dir: Optional[str] = None, resume: bool = True,
                  quiet: bool = True) -> TADResult:
    """TAD's rounds of partition and recall alone, without distillation (benchmarks, diagnostics).

    Same arguments and per-round diagnostics as :func:`run_tad`; ``result.synset`` is None and
    ``result.state`` holds the final trusted set and pseudo-labels. The per-class minimum is
    ``config.min_trusted_per_class``."""
    return _TADRun(None, train, _config_of(config), clean_labels=clean_labels, device=device,
                   checkpoint_dir=checkpoint_dir, resume=resume, quiet=quiet, callback=None).run()


class _TADRun:
    """One TAD run: rounds (computed or loaded), diverted distillation (once, or after every round)."""

    def __init__(self, distiller: Optional[Distiller], train: TrainSet, cfg: TADConfig, *, clean_labels, device,
                 checkpoint_dir, resume, quiet, callback):
        if not isinstance(train, TrainSet):
            raise TypeError(f"train must be a TrainSet, got {type(train).__name__}")
        self.d, self.train, self.cfg = distiller, train, cfg
        self.device = torch.device(device) if device is not None else (
            distiller.device if distiller is not None else torch.device("cpu"))
        self.ckpt, self.resume, self.quiet, self.callback = checkpoint_dir, resume, quiet, callback
        C = train.num_classes
        counts = torch.bincount(train.labels, minlength=C)
        if bool((counts == 0).any()):
            raise ValueError(f"train: class(es) {torch.nonzero(counts == 0).flatten().tolist()} have no sample")
        ipc = int(getattr(distiller.config, "ipc", 1)) if distiller is not None else 1
        min_per_class = max(int(cfg.min_trusted_per_class), ipc)
        fingerprint = {"tad_config": cfg.to_dict(), "data": labels_digest(train), "min_per_class": min_per_class,
                       "num_classes": C,
                       "images": tensor_digest(train.images[:: max(1, train.images.shape[0] // 64)])}
        if cfg.schedule == "interleaved" and distiller is not None:
            fingerprint["distill_iterations"] = int(distiller.config.iterations)
        self.store = RoundStore(checkpoint_dir, fingerprint)
        scorer = TrustScorer(cfg, train.in_channels, C, train.im_size, train.mean, train.std, self.device)
        self.ctx = RoundContext(cfg, train, scorer, _clean_labels_of(clean_labels, train.images.shape[0]),
                                min_per_class)
        self.diagnostics: List[Dict[str, Any]] = []
        self._views: Optional[DistillViews] = None
        self._views_for: Optional[TrustState] = None
        self.divert_pool: Union[bool, str, None] = None  # cfg.divert_pool resolved (resolve_divert_pool)
        self.divert_real: Union[bool, str, None] = None  # cfg.divert_real resolved (resolve_divert_real)
        self.t_distill = 0.0

    def say(self, msg: str) -> None:
        if not self.quiet:
            print(msg, flush=True)

    def _ends(self) -> List[int]:
        iters = int(self.d.config.iterations) if self.d is not None else 0
        R = self.cfg.rounds
        return [iters * (r + 1) // R for r in range(R)]

    def _load_finished(self):
        """``(last finished round or None, its state, round 0's state)`` from the round checkpoints."""
        if not self.resume:
            self.store.clear(self.cfg.rounds)
            return None, None, None
        done = self.store.latest(self.cfg.rounds)
        if done is None:
            return None, None, None
        state, self.diagnostics = self.store.load(done, self.ctx.scorer.model)
        self.say(f"TAD: rounds 0..{done} loaded from {self.store.dir}")
        first = None
        if self.cfg.schedule == "interleaved":  # round 0's view feeds the experts/pool and the initialisation
            first = state if done == 0 else self.store.load(0, self.ctx.scorer.new_model(0))[0]
        return done, state, first

    def _compute_round(self, r: int, state: Optional[TrustState], ends: List[int]) -> TrustState:
        state, diag = run_round(self.ctx, r, state)
        if self.cfg.schedule == "interleaved":
            diag["start_iteration"] = ends[r - 1] if r else 0
            diag["end_iteration"] = ends[r]
        self.diagnostics = self.diagnostics[:r] + [diag]
        self.store.save(r, state, self.ctx.scorer.model, self.diagnostics)
        self.say(_line(diag))
        return state

    def run(self) -> TADResult:
        cfg, ends = self.cfg, self._ends()
        done, state, first = self._load_finished()
        fresh = True
        for r in range(cfg.rounds):
            if done is not None and r < done:
                continue
            if done is None or r > done:
                state = self._compute_round(r, state, ends)
            if r == 0:
                first = state
            if cfg.schedule == "interleaved" and self.d is not None:
                self._distill(first, state, until=ends[r], fresh=fresh)
                fresh = False
        if self.d is None:
            return TADResult(None, [dict(x) for x in self.diagnostics], self._summary(state), state, cfg)
        if cfg.schedule == "pre":
            syn = self._distill(state, state, until=ends[-1], fresh=True)
        else:
            syn = self.d.synthetic_set()
        summary = self._summary(state)
        syn.metadata = dict(syn.metadata or {})
        syn.metadata["tad"] = {"config": cfg.to_dict(), "summary": summary}
        return TADResult(syn, [dict(x) for x in self.diagnostics], summary, state, cfg)

    def _regularizer(self) -> Optional[ConsistencyRegularizer]:
        if self.cfg.consistency_lambda <= 0:
            return None
        scorer = self.ctx.scorer
        model = scorer.new_model(0)
        model.load_state_dict(scorer.model.state_dict())
        return ConsistencyRegularizer(model, self.cfg, self.train.mean, self.train.std, distiller=self.d)

    def _distill(self, first: TrustState, current: TrustState, *, until: int, fresh: bool) -> SyntheticSet:
        """Distils up to iteration ``until``: experts/pool and initialisation from ``first``'s views (the same
        view objects on every call, so they are prepared once), real data from ``current``'s."""
        cfg = self.cfg
        if self._views_for is not first:
            self.divert_pool = resolve_divert_pool(cfg.divert_pool, self.d, first, cfg.divert_noise_rate,
                                                   labels=self.train.labels, min_class_share=cfg.divert_min_class_share)
            self._views = DistillViews(pool=diverted_view(self.train, first, self.divert_pool, cfg.pass_weights),
                                       init=diverted_view(self.train, first, cfg.divert_init, cfg.pass_weights))
            self._views_for = first
        self.divert_real = resolve_divert_real(cfg.divert_real, current, self.train.labels, cfg.divert_min_class_share)
        real = diverted_view(self.train, current, self.divert_real, cfg.pass_weights)
        t0 = time.perf_counter()
        syn = self.d.run(real, views=self._views, extra_loss=self._regularizer(), initialize=fresh, until=until,
                         checkpoint_dir=os.path.join(self.ckpt, "distill") if self.ckpt else None,
                         resume=self.resume, callback=self.callback)
        self.t_distill += time.perf_counter() - t0
        return syn

    def _summary(self, state: TrustState) -> Dict[str, Any]:
        last = self.diagnostics[-1] if self.diagnostics else {}
        overhead = sum(float(x.get("seconds", {}).get("total", 0.0)) for x in self.diagnostics)
        cl = sum(float(x.get("seconds", {}).get("cleanlab", 0.0)) for x in self.diagnostics)
        s = {"rounds": self.cfg.rounds, "schedule": self.cfg.schedule, "n_trusted": int(state.trusted.sum()),
             "n_pseudo_labelled": int((state.replacement >= 0).sum()), "tad_seconds": overhead,
             "cleanlab_seconds": cl, "distill_seconds": self.t_distill}
        if state.noise_rate is not None:
            s["noise_rate_estimate"] = float(state.noise_rate)
        if self.divert_pool is not None:  # "n/a" for a method that trains no network on real images (RCIG)
            s["divert_pool"] = self.divert_pool if getattr(self.d, "trains_on_real_images", True) else "n/a"
        if self.divert_real is not None:
            s["divert_real"] = self.divert_real
        s["min_class_share"] = round(state.min_class_share(self.train.labels, self.train.num_classes), 4)
        for k in ("precision", "recall", "label_accuracy_after"):
            if last.get(k) is not None:
                s[k] = last[k]
        return s


def _line(d: Dict[str, Any]) -> str:
    s = (f"TAD round {d['round']}: trusted {d['n_trusted_gmm']} (GMM) + {d['n_recalled']} recalled = "
         f"{d['n_trusted']}/{d['n']}")
    if d.get("precision") is not None:
        s += f"; precision {100 * d['precision']:.1f}% recall {100 * d['recall']:.1f}%"
    if d.get("pseudo_label_accuracy") is not None:
        s += f"; pseudo-labels {100 * d['pseudo_label_accuracy']:.1f}% correct"
    return s + f" ({d['seconds']['total']:.1f} s)"
