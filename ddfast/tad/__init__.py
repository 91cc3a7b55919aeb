"""Trust-aware diversion (TAD): a wrapper that turns a dataset distiller into a noise-robust one.

Source: Wu, Liu, Shen, Cao, Yu, "Trust-Aware Diversion for Data-Effective Distillation", arXiv 2502.05027
(2025) -- an iterative dual loop around an unmodified distiller. The *outer loop* splits the training data into
a trusted and an untrusted space (class-wise "dynamic" Gaussian mixture on per-sample losses) and diverts
distillation to the trusted samples; the *inner loop* recalibrates untrusted samples (Mahalanobis distance and
cosine similarity to class anchors, selective pseudo-labels) and recalls the reliable ones into the trusted
space; a consistency regulariser stabilises the synthetic set. The paper's code and hyperparameters are not
public: everything below marked **[ddfast]** is this project's design, each part a documented option of
:class:`TADConfig` with an off switch.

Algorithm (one TAD run, ``R = TADConfig.rounds``)::

    round 0: train the scoring network f on the noisy labels for `scorer.warmup_epochs` (short: before it memorises
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
                    parts switched on: expert/pool training and synthetic initialisation
                    (``Distiller.run(views=DistillViews(pool, init))``), real statistics/batches;
                    [ddfast] when T keeps < divert_min_class_share of some class, the pool and the real
                    data see every sample with its posterior label argmax_j p_f(j|x) T[j, y~] instead
                    (TADConfig.divert_pool / divert_real = "auto"; ddfast.noise.posterior_labels)
      distillation: L_B(S; T) + lambda * L_cons(S), L_cons = CE(f(DSA_1(S)), y_S) + CE(f(DSA_2(S)), y_S) / 2
                    through ``Distiller.run(extra_loss=...)``

Schedules [ddfast] (``TADConfig.schedule``): ``"pre"`` (default) runs all R rounds of partition/recall first
and then distils once on the final trusted set (experts/pool built once, on the best partition);
``"interleaved"`` distils ``iterations / R`` steps after every round on that round's view (the paper's dual
loop; experts/pool are built on round 0's trusted set, later rounds swap the real-data view with
``Distiller.update_train``). See benchmarks/RESULTS.md ("TAD: trust partition quality") for the measurement
behind the default.

Entry point: :func:`run_tad` (what the CLI calls). The package's modules: ``config`` (:class:`TADConfig`,
:class:`ScorerConfig`), ``partition`` (:func:`partition`, :func:`recall`, :func:`pooled_precision`, and the
diagnostics :func:`partition_metrics`, :func:`cleanlab_detector`), ``scorer`` (:class:`TrustScorer`,
:func:`kfold_pred_probs`), ``consistency`` (:class:`ConsistencyRegularizer`), ``rounds`` (one round,
:class:`TrustState`, the round checkpoints, :func:`diverted_view`) and ``run`` (:func:`run_tad`,
:func:`tad_partition`).

cleanlab comparison and its out-of-sample caveat: ``cleanlab.filter.find_label_issues`` (Northcutt et al.,
JAIR 2021, confident learning) expects *out-of-sample* predicted probabilities. TAD's rounds score every
sample with a network trained on it, so the per-round comparison feeds cleanlab the **same in-sample
predictions of f** that TAD's GMM sees (apples to apples; f is trained for only a few epochs on noisy labels
and has not memorised them, so its in-sample predictions are close to out-of-sample -- the benchmark measures
f's agreement with the noisy labels on the mislabelled samples to show it). With ``cleanlab_folds=K >= 2``,
round 0 additionally runs cleanlab on K-fold cross-validated predictions (K warm-up networks, each scoring
the fold it did not see): cleanlab as its authors intend, at (K-1) times the warm-up cost.
"""
from .config import (CONSISTENCY_TARGETS, COVARIANCES, LOSS_NORMS, REFINES, SCHEDULES, TRUST_STATISTICS,
                     TRUST_UPDATES, ScorerConfig, TADConfig)
from .consistency import ConsistencyRegularizer
from .partition import cleanlab_detector, partition, partition_metrics, pooled_precision, recall
from .rounds import TrustState, diverted_view
from .run import TADResult, resolve_divert_pool, resolve_divert_real, run_tad, tad_partition
from .scorer import TrustScorer, kfold_pred_probs, tad_seed

__all__ = [
    "TADConfig",
    "ScorerConfig",
    "TADResult",
    "TrustState",
    "TrustScorer",
    "ConsistencyRegularizer",
    "run_tad",
    "tad_partition",
    "resolve_divert_pool",
    "resolve_divert_real",
    "partition",
    "recall",
    "pooled_precision",
    "diverted_view",
    "partition_metrics",
    "cleanlab_detector",
    "kfold_pred_probs",
    "tad_seed",
    "SCHEDULES",
    "COVARIANCES",
    "REFINES",
    "LOSS_NORMS",
    "TRUST_UPDATES",
    "TRUST_STATISTICS",
    "CONSISTENCY_TARGETS",
]
