"""TAD's outer loop (the trust partition), inner loop (recall of untrusted samples) and their diagnostics.

Outer loop: a class-wise two-component Gaussian mixture on per-sample losses; trusted = low-loss component
(TAD, Wu et al., arXiv 2502.05027; the loss GMM of DivideMix, Li et al., ICLR 2020). Inner loop: class anchors
and a shrunk pooled covariance of the trusted features; untrusted samples close to an anchor (Mahalanobis
distance and cosine similarity) are pseudo-labelled and recalled. The exact rules and thresholds are [ddfast]
choices, each an option of :class:`ddfast.tad.TADConfig`.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch

from ..ops import anchor_distances, classwise_gmm
from .config import COVARIANCES, LOSS_NORMS

__all__ = ["partition", "pooled_precision", "recall", "partition_metrics", "cleanlab_detector"]


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
