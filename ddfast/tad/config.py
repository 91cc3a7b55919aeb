"""TAD's options: :class:`TADConfig` with its nested :class:`ScorerConfig` (:mod:`ddfast.config` mechanism)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from ..augment import DSA
from ..config import Config, option
from ..models import NetConfig

__all__ = ["TADConfig", "ScorerConfig", "SCHEDULES", "COVARIANCES", "REFINES", "LOSS_NORMS", "TRUST_UPDATES",
           "TRUST_STATISTICS", "CONSISTENCY_TARGETS"]

SCHEDULES = ("pre", "interleaved")
COVARIANCES = ("ledoit_wolf", "fixed", "identity")
REFINES = ("finetune", "retrain", "none")
LOSS_NORMS = ("minmax", "none")
TRUST_UPDATES = ("grow", "refit")
TRUST_STATISTICS = ("loss", "margin")
CONSISTENCY_TARGETS = ("auto", "soft", "hard")


@dataclass
class ScorerConfig(Config):
    """TAD's scoring network f, trained on the noisy labels; its losses, predictions and features drive the
    trust partition and the recall [ddfast].

    Attributes:
        net: the network (:class:`ddfast.models.NetConfig`). Default: ConvNet-3 of width 16 (an eighth of
            DATM's), sized so that TAD's own cost on 60k Fashion-MNIST images stays around two CPU-minutes.
        warmup_epochs: epochs of round-0 training (float allowed: 0.5 = half an epoch). Short on purpose: a
            network trained briefly on noisy labels fits the clean majority before it memorises the noise
            (Arpit et al., ICML 2017; DivideMix's warm-up, Li et al., ICLR 2020). Default 2.
        lr, momentum, weight_decay, batch_size: SGD recipe of f. Defaults 0.01 / 0.9 / 5e-4 / 256.
        max_samples: train f on at most this many samples (a seeded random subset; every sample is still
            scored). 0 = all.
        dsa: DSA augmentation while training f (off by default: cost).
        refine: between rounds, ``"finetune"`` f on the trusted set (with pseudo-labels), ``"retrain"`` a new f
            on it from scratch (``warmup_epochs``), or ``"none"`` (f fixed after the warm-up). Default finetune.
        refine_epochs: epochs of each fine-tuning. Default 1.
        high_noise_epochs: when the noise rate estimated from f after the warm-up
            (:func:`ddfast.noise.estimate_noise_rate`) exceeds ``TADConfig.divert_noise_rate`` (most given labels
            wrong), f trains on with the same recipe until it has seen this many epochs in total, then round 0
            goes on. 0 (or a value <= ``warmup_epochs``) = off. The rule [ddfast]: with most labels wrong, the
            signal per epoch is weak (at 80 % symmetric noise over 10 classes a class keeps 20 % of its labels
            against 8.9 % for each other class) and the early-learning phase lasts longer. Measured on
            Fashion-MNIST at sym 0.8 (seed 0, after round 2, f trained from scratch for that many epochs;
            benchmarks/RESULTS.md): posterior labels 75.4 % right after 2 epochs, 78.9 % after 5, 80.6 % after 8,
            81.3 % after 12 (a wider f, width 32, 71.8 % after 2); at sym 0.4 / asym 0.4 / idn 0.4 the estimate
            stays below 0.5 and nothing changes. Default 12.
    """

    net: NetConfig = option(factory=lambda: NetConfig(width=16, depth=3, norm="instance"))
    warmup_epochs: float = option(2.0, gt=0)
    lr: float = option(0.01, gt=0)
    momentum: float = option(0.9, ge=0, lt=1)
    weight_decay: float = option(5e-4, ge=0, le=1)
    batch_size: int = option(256, ge=1)
    max_samples: int = option(0, ge=0)
    dsa: bool = option(False)
    refine: str = option("finetune", choices=REFINES)
    refine_epochs: float = option(1.0, ge=0)
    high_noise_epochs: float = option(12.0, ge=0)


@dataclass
class TADConfig(Config):
    """Every choice of TAD, each with an off switch ([ddfast] marks this project's design where the paper,
    Wu et al., arXiv 2502.05027, is silent).

    Rounds and schedule:
        rounds: R >= 1 rounds of partition + recall (the paper's iterations of the dual loop). Default 3.
        schedule: ``"pre"`` -- all rounds first, then one distillation on the final trusted set (default);
            ``"interleaved"`` -- ``iterations // R`` distillation steps after every round (last round takes the
            remainder), experts/pool built on round 0's view, later views swapped in with ``update_train``.

    Scoring network: ``scorer`` (:class:`ScorerConfig`, nested: ``-O tad.scorer.warmup_epochs=1``).

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

    Diversion (what the distiller sees):
        divert_pool: expert trajectories (DATM) / model pool (DANCE) trained on the trusted view
            (``True``), on the plain noisy set (``False``), or on *every* sample with TAD's labels (``"relabel"``:
            recalled samples carry their pseudo-labels, no sample is dropped). Measured with DATM (Fashion-MNIST,
            sym 0.4, quick, IPC 10; benchmarks/RESULTS.md "Why TAD lowers DATM"): experts on the trusted view
            lose the hard clean samples of the hard classes (the trusted set holds 34 % of all Shirt images
            against 91 % of all Trouser images) and the distilled set drops from 77.33 % (``False``; base DATM
            77.35 %) to 75.67 % (``True``); ``"relabel"`` gives 76.57 %. ``"corrected"`` [ddfast]: every sample
            with its given label, and the networks (experts / pool) trained with forward loss correction
            (Patrini et al., CVPR 2017) under the noise transition TAD estimates from its scorer
            (:func:`ddfast.noise.estimate_transition`): no hard-but-clean image is dropped and the flipped labels
            are accounted for instead of removed. Measured with DATM (same setting, current quick preset, seed 0):
            75.33 % against 77.81 % for base DATM -- the corrected experts cost Dress, Shirt and Pullover 8-13
            points (benchmarks/RESULTS.md, "TAD variants for DATM"). ``"posterior"`` [ddfast]: every sample,
            labelled with its most probable true class given its image (the scorer's probabilities) and its given
            label under the estimated transition (:func:`ddfast.noise.posterior_labels`, Bayes' rule as in Xiao
            et al., CVPR 2015), class-balanced (``posterior_balance``): pair flips are resolved by the image and no
            sample is dropped. Measured at asym 0.4 (Fashion-MNIST, IPC 10, quick, seed 0; benchmarks/RESULTS.md,
            "TAD at the current presets"): 89.9 % of the labels right (75.9 % given); DATM 77.01 % against 74.25 %
            base and 74.36 % with the trusted view, DANCE 77.53 % against 74.94 % base and 76.58 % with the
            trusted pool. RCIG's pool trains on the synthetic set only, so for RCIG every value of ``divert_pool``
            is the same. ``"auto"`` (the default) [ddfast]: ``"posterior"`` when the trusted set keeps less than
            ``divert_min_class_share`` of some class while the posterior labels keep at least that share of every
            class; otherwise ``True`` for a model pool (DANCE: measured gains at every noise kind), and for expert
            trajectories
            (DATM, whose synthetic set learns whatever the experts cover) ``True`` only when the noise rate TAD
            estimates (``TrustState.noise_rate``, :func:`ddfast.noise.estimate_noise_rate`) exceeds
            ``divert_noise_rate``, else ``False``. The rule: divert the experts only when most given labels are
            wrong. Measured with DATM (Fashion-MNIST, IPC 10, quick preset, seed 0): at 80 % symmetric noise
            (estimate 0.79) the trusted view lifts it from 68.48 % to 73.08 %; at 40 % (estimate 0.40) it cost
            1.7 points on the earlier preset and ``False`` tied base DATM (benchmarks/RESULTS.md).
        divert_noise_rate: the estimated noise rate above which ``divert_pool="auto"`` diverts DATM's experts.
            Default 0.5 (a majority of wrong labels).
        divert_min_class_share: the ``"auto"`` rules of ``divert_pool`` and ``divert_real`` switch to the
            posterior labels when the trusted set keeps less than this share of some class's given labels
            (:meth:`~ddfast.tad.rounds.TrustState.min_class_share`; label-free) and the posterior labels keep at
            least this share of every class; 0 = never. The rule: a trusted set that all but drops a class cannot
            teach it, whatever its precision; otherwise the trusted view's higher precision wins. Measured
            (Fashion-MNIST, IPC 10, quick presets, seed 0; benchmarks/RESULTS.md, "TAD's posterior labels"): the
            trusted set keeps 0.12 of the T-shirts under asym 0.4 and 0.02 of the Shirts under sym 0.8, against
            >= 0.30 of every class under sym 0.4 and idn 0.4; RCIG's real batches with the posterior labels give
            79.84 % at asym 0.4 (trusted view 74.07 %, base 74.60 %) but 79.88 % at sym 0.4 (trusted view
            80.49 %); DANCE's pool and real statistics on them 80.94 % at asym 0.4 (trusted view 76.58 %, base
            74.94 %). Default 0.2.
        posterior_balance: the posterior labels (``divert_pool="posterior"``) keep the given labels' class
            shares (``class_prior`` of :func:`ddfast.noise.posterior_labels`). Without it, under Fashion-MNIST's
            pair swaps (asym 0.4) the posterior moved 89 % of the T-shirts to Shirt and DATM's distilled set
            fell to 72.20 % (base 74.25 %; benchmarks/RESULTS.md). Default True.
        transition_quantile: share in (0, 1] of the samples f assigns to a class, most confident first, used as
            that class's anchors when the transition is estimated (``"corrected"``). Default 0.1.
        divert_init: synthetic images (and DATM's label logits) initialised from the trusted view.
        divert_real: real batches / per-class statistics of distillation steps from the trusted view
            (``True``), from the plain noisy set (``False``), or from every sample with TAD's labels: its
            pseudo-labels (``"relabel"``) or the posterior labels (``"posterior"``, see ``divert_pool``). For RCIG,
            whose outer loss is the only place real labels enter, ``"posterior"`` is how the posterior labels
            reach it. ``"posterior_soft"`` [ddfast]: the ``"posterior"`` view, and RCIG's outer cross-entropy takes
            the whole posterior distribution as its target (:func:`ddfast.noise.posterior_probabilities`): with a
            calibrated scorer that is the expected loss on the unknown clean labels, and a sample the scorer
            cannot place spreads its weight over its likely classes instead of committing to one. DANCE draws
            class ``c``'s real batches from every image with probability ``P(true c | image, given label)``
            (posterior-weighted class statistics); DATM sees the ``"posterior"`` view. Measured with RCIG at sym
            0.8 (Fashion-MNIST, IPC 10, quick, seed 0, 2-epoch scorer; benchmarks/RESULTS.md): 74.51 % against
            74.76 % on the hard posterior labels. The scorer's posterior is overconfident (images at a top
            probability of 0.97 are 90.7 % right) and its soft class mass is less pure than the argmax in every
            class, so no ``"auto"`` rule picks it. ``"auto"`` (the default) [ddfast]: ``"posterior"`` by the ``divert_min_class_share`` rule,
            else ``True``.
        pass_weights: hand the GMM posteriors (1 for recalled samples) to the distiller as ``weights``.
            ``divert_init`` and ``pass_weights`` default True.

    Consistency regularisation on the synthetic set:
        consistency_lambda: weight lambda of ``L_cons`` added through the distiller's ``extra_loss``; 0 = off.
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

    Raises ``ValueError`` naming the field for any invalid value.
    """

    rounds: int = option(3, ge=1)
    schedule: str = option("pre", choices=SCHEDULES)
    scorer: ScorerConfig = option(factory=ScorerConfig)
    trust_statistic: str = option("loss", choices=TRUST_STATISTICS)
    loss_ema: float = option(0.5, ge=0, lt=1)
    loss_norm: str = option("minmax", choices=LOSS_NORMS)
    gmm_iters: int = option(20, ge=1)
    gmm_tol: float = option(1e-3, ge=0)
    gmm_reg_covar: float = option(5e-4, gt=0)
    gmm_warm_start: bool = option(False)
    tau: float = option(0.5, gt=0, lt=1)
    trust_agreement: bool = option(True)
    trust_update: str = option("grow", choices=TRUST_UPDATES)
    recall: bool = option(True)
    covariance: str = option("ledoit_wolf", choices=COVARIANCES)
    shrinkage: float = option(0.1, ge=0, le=1)
    cov_max_samples: int = option(20000, ge=0)
    maha_quantile: float = option(0.9, gt=0, le=1)
    kappa: float = option(0.5, ge=-1, le=1)
    require_agreement: bool = option(True)
    recall_ratio: float = option(0.7, gt=0, le=1)
    min_trusted_per_class: int = option(1, ge=0)
    divert_pool: Union[bool, str] = option("auto", choices=("auto", True, False, "relabel", "corrected", "posterior"))
    divert_noise_rate: float = option(0.5, ge=0, le=1)
    posterior_balance: bool = option(True)
    transition_quantile: float = option(0.1, gt=0, le=1)
    divert_init: bool = option(True)
    divert_real: Union[bool, str] = option("auto", choices=("auto", True, False, "relabel", "posterior",
                                                            "posterior_soft"))
    divert_min_class_share: float = option(0.2, ge=0, le=1)
    pass_weights: bool = option(True)
    consistency_lambda: float = option(0.1, ge=0)
    consistency_dsa: str = option("color_crop_cutout_flip_scale_rotate")
    consistency_target: str = option("auto", choices=CONSISTENCY_TARGETS)
    consistency_label_grad: bool = option(False)
    cleanlab: bool = option(True)
    cleanlab_folds: int = option(0, ge=0)
    seed: int = option(0)

    def check(self) -> None:
        if self.consistency_dsa:
            try:
                DSA(self.consistency_dsa)
            except (ValueError, TypeError) as exc:
                self.fail("consistency_dsa", str(exc))
        if self.cleanlab_folds == 1:
            self.fail("cleanlab_folds", "must be 0 (off) or an int >= 2, got 1")
