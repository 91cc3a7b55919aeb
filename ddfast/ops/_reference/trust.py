"""Pure-PyTorch references of the per-sample trust-scoring ops (TAD, arXiv 2502.05027).

Each function mirrors the schema of its ``torch.ops.ddfast`` op exactly (same arguments, same outputs,
same dtypes), takes no argument checks (the public wrappers in :mod:`ddfast.ops.trust` do them) and is
written for clarity: it is the fallback without the extension, the tests' oracle and the benchmarks'
eager baseline. Rows are processed in chunks only to bound temporary memory.

Accumulation dtype (``acc``): float64 for float64 inputs, float32 otherwise (float16/bfloat16/float32).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "sample_stats",
    "sample_stats_ema_",
    "classwise_gmm",
    "gmm_init",
    "anchor_distances",
    "acc_dtype",
]

# temporaries of at most this many elements per chunk ([rows, C] or [rows, D] blocks)
_CHUNK_ELEMS = 1 << 24


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation / output dtype of the trust ops for an input dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_chunks(n: int, width: int):
    step = max(1, _CHUNK_ELEMS // max(1, width))
    for s in range(0, n, step):
        yield s, min(n, s + step)


# --------------------------------------------------------------------------------------------------
# sample_stats
# --------------------------------------------------------------------------------------------------
def sample_stats(logits: Tensor, labels: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(loss, confidence, margin, prediction)`` per row of ``logits [N, C]`` (see ddfast.ops.sample_stats)."""
    n, c = logits.shape
    acc = acc_dtype(logits.dtype)
    loss = torch.empty(n, dtype=acc, device=logits.device)
    conf = torch.empty_like(loss)
    margin = torch.empty_like(loss)
    pred = torch.empty(n, dtype=torch.int64, device=logits.device)
    for s, e in _row_chunks(n, c):
        z = logits[s:e].to(acc)
        y = labels[s:e].long().unsqueeze(1)
        lse = torch.logsumexp(z, dim=1)
        zy = z.gather(1, y).squeeze(1)
        # largest logit among the other classes; -inf when C == 1 (no other class: probability 0)
        other = z.scatter(1, y, float("-inf")).amax(dim=1)
        # a row with NaN, +inf or only -inf has no defined loss: NaN statistics (the wrapper raises)
        zmax = z.amax(dim=1)
        bad = torch.isnan(zmax) | torch.isinf(zmax)
        nan = torch.full_like(lse, float("nan"))
        loss[s:e] = torch.where(bad, nan, lse - zy)
        conf[s:e] = torch.where(bad, nan, torch.exp(zy - lse))
        margin[s:e] = torch.where(bad, nan, conf[s:e] - torch.exp(other - lse))
        pred[s:e] = z.argmax(dim=1)  # first maximal index on ties
    return loss, conf, margin, pred


def sample_stats_ema_(logits: Tensor, labels: Tensor, ema: Tensor, momentum: float):
    """:func:`sample_stats` plus the in-place update ``ema <- momentum * ema + (1 - momentum) * loss``."""
    out = sample_stats(logits, labels)
    with torch.no_grad():
        ema.copy_(momentum * ema + (1.0 - momentum) * out[0].to(ema.dtype))
    return out


# --------------------------------------------------------------------------------------------------
# classwise_gmm
# --------------------------------------------------------------------------------------------------
_LOG_2PI = math.log(2.0 * math.pi)
# Two components whose means differ by less than this many standard deviations are indistinguishable: their
# order would be decided by rounding, not by the data, so they keep their EM order (same rule in the kernels).
GMM_TIE_SD = 1e-3


def _log_prob(x: Tensor, y: Tensor, w: Tensor, mu: Tensor, var: Tensor) -> Tensor:
    """log(w_k N(x | mu_k, var_k)) for both components of each sample's class -> [N, 2]."""
    xx = x.unsqueeze(1)
    return torch.log(w[y]) - 0.5 * (_LOG_2PI + torch.log(var[y])) - 0.5 * (xx - mu[y]) ** 2 / var[y]


def classwise_gmm(values: Tensor, labels: Tensor, num_classes: int, num_iters: int, tol: float,
                  reg_covar: float, init_weights: Tensor, init_means: Tensor, init_variances: Tensor):
    """Per-class two-component 1-D GMM by EM, all classes at once (see ddfast.ops.classwise_gmm).

    Mirrors scikit-learn's ``GaussianMixture.fit`` step for step, in float64 whatever ``values``' dtype: an E-step with the current parameters
    (its mean log-likelihood is the convergence criterion), an M-step with ``nk = sum(resp) + 10 eps``,
    ``mean = sum(resp x) / nk``, ``var = sum(resp (x - mean)^2) / nk + reg_covar``, ``weight = nk / sum(nk)``;
    a class stops after the iteration whose log-likelihood changed by less than ``tol``. Classes with fewer
    than two samples keep their initial parameters (0 iterations). A final E-step gives the posteriors,
    and each class's components are ordered by mean.

    Returns ``(posterior_low [N], weights [C, 2], means [C, 2], variances [C, 2], n_iter [C] int64)``.
    """
    out_dt = values.dtype
    dt = torch.float64  # the EM runs in float64 (as the kernels' class sums): float32 sums of large, tightly
    dev = values.device  # clustered values cancel (e.g. values near 1e11 with a spread of 1e5)
    C = num_classes
    x = values.to(dt)
    y = labels.long()
    eps10 = 10.0 * torch.finfo(out_dt).eps
    w = init_weights.to(dt).clone()
    mu = init_means.to(dt).clone()
    var = init_variances.to(dt).clone()
    y2 = torch.stack([2 * y, 2 * y + 1], dim=1).flatten()  # flat index of (class, component)

    def csum2(v):  # per-class sums of an [N, 2] quantity -> [C, 2] (1-D index_add: the fast path)
        return torch.zeros(2 * C, dtype=dt, device=dev).index_add_(0, y2, v.flatten()).view(C, 2)

    counts = torch.zeros(C, dtype=dt, device=dev).index_add_(0, y, torch.ones_like(x))
    active = counts >= 2
    n_iter = torch.zeros(C, dtype=torch.int64, device=dev)
    ll_prev = torch.full((C,), float("-inf"), dtype=dt, device=dev)
    for _ in range(num_iters):
        if x.numel() == 0 or (not torch.compiler.is_compiling() and not bool(active.any())):
            break  # (under torch.compile all iterations run; the masks keep the result identical)
        # E-step with the current parameters
        lp = _log_prob(x, y, w, mu, var)
        lse = torch.logsumexp(lp, dim=1)
        resp = torch.exp(lp - lse.unsqueeze(1))
        ll = torch.zeros(C, dtype=dt, device=dev).index_add_(0, y, lse) / counts.clamp_min(1)
        # M-step
        nk = csum2(resp) + eps10
        mu_new = csum2(resp * x.unsqueeze(1)) / nk
        var_new = csum2(resp * (x.unsqueeze(1) - mu_new[y]) ** 2) / nk + reg_covar
        w_new = nk / nk.sum(dim=1, keepdim=True)
        a = active.unsqueeze(1)
        w = torch.where(a, w_new, w)
        mu = torch.where(a, mu_new, mu)
        var = torch.where(a, var_new, var)
        n_iter += active.long()
        converged = (ll - ll_prev).abs() < tol
        ll_prev = torch.where(active, ll, ll_prev)
        active = active & ~converged
    # component 0 := the lower mean; means within GMM_TIE_SD standard deviations are a tie and keep their order
    swap = mu[:, 1] < mu[:, 0] - GMM_TIE_SD * torch.sqrt(torch.maximum(var[:, 0], var[:, 1]))
    order = torch.stack([swap.long(), 1 - swap.long()], dim=1)
    w, mu, var = w.gather(1, order), mu.gather(1, order), var.gather(1, order)
    # final E-step with the final parameters (rounded to the output dtype first, as the kernels do)
    w, mu, var = w.to(out_dt), mu.to(out_dt), var.to(out_dt)
    if x.numel() > 0:
        lp = _log_prob(x, y, w.to(dt), mu.to(dt), var.to(dt))
        post = torch.exp(lp[:, 0] - torch.logsumexp(lp, dim=1)).to(out_dt)
    else:
        post = torch.empty(0, dtype=out_dt, device=dev)
    return post, w, mu, var, n_iter


def gmm_init(values: Tensor, labels: Tensor, num_classes: int, method: str, reg_covar: float):
    """Deterministic per-class initialisation of :func:`classwise_gmm` -> ``(weights, means, variances)`` [C, 2].

    ``"mean_split"`` (default of the public op): split the class at its mean; component 0 = the samples
    ``<= mean``, component 1 = the rest; weights = group fractions, means = group means, variances =
    group variances + reg_covar (one Lloyd step of 2-means started from the class mean).
    ``"minmax"``: weights (1/2, 1/2), means (min, max), both variances = class variance + reg_covar.

    Degenerate classes, either method: a class with 0 samples gets weights (1/2, 1/2), means (0, 0),
    variances (reg_covar, reg_covar); a class whose values are all equal to ``v`` (including a single
    sample), or whose split leaves a group empty, gets weights (1/2, 1/2), means (m, m) and variances
    (s + reg_covar, s + reg_covar) with m, s the class mean and variance (s = 0 for a constant class).
    Computed in float64, returned in ``values.dtype``.
    """
    C = num_classes
    dev = values.device
    x = values.to(torch.float64)
    y = labels.long()

    def csum(v):
        return torch.zeros(C, dtype=torch.float64, device=dev).index_add_(0, y, v)

    n = csum(torch.ones_like(x))
    mean = csum(x) / n.clamp_min(1)
    cvar = csum((x - mean[y]) ** 2) / n.clamp_min(1)
    half = torch.full((C, 2), 0.5, dtype=torch.float64, device=dev)
    if method == "mean_split":
        low = x <= mean[y]
        lowf = low.to(torch.float64)
        n0 = csum(lowf)
        n1 = n - n0
        m0 = csum(x * lowf) / n0.clamp_min(1)
        m1 = csum(x * (1 - lowf)) / n1.clamp_min(1)
        gm = torch.where(low, m0[y], m1[y])
        sq = (x - gm) ** 2
        s0 = csum(sq * lowf) / n0.clamp_min(1)
        s1 = csum(sq * (1 - lowf)) / n1.clamp_min(1)
        w = torch.stack([n0, n1], 1) / n.clamp_min(1).unsqueeze(1)
        mu = torch.stack([m0, m1], 1)
        var = torch.stack([s0, s1], 1) + reg_covar
        ok = ((n0 > 0) & (n1 > 0)).unsqueeze(1)
    elif method == "minmax":
        big = torch.finfo(torch.float64).max
        lo = torch.full((C,), big, dtype=torch.float64, device=dev).scatter_reduce(0, y, x, "amin")
        hi = torch.full((C,), -big, dtype=torch.float64, device=dev).scatter_reduce(0, y, x, "amax")
        w = half
        mu = torch.stack([lo, hi], 1)
        var = (cvar + reg_covar).unsqueeze(1).expand(C, 2)
        ok = (hi > lo).unsqueeze(1)
    else:
        raise ValueError(f"init: unknown method {method!r}; expected 'mean_split', 'minmax' or a tuple")
    fb_mu = mean.unsqueeze(1).expand(C, 2)
    fb_var = (cvar + reg_covar).unsqueeze(1).expand(C, 2)
    w = torch.where(ok, w, half)
    mu = torch.where(ok, mu, fb_mu)
    var = torch.where(ok, var, fb_var)
    dt = values.dtype
    return w.to(dt).contiguous(), mu.to(dt).contiguous(), var.to(dt).contiguous()


# --------------------------------------------------------------------------------------------------
# anchor_distances
# --------------------------------------------------------------------------------------------------
def anchor_distances(features: Tensor, anchors: Tensor, precision: Optional[Tensor], eps: float):
    """``(mahalanobis_sq [N, C], cosine [N, C])`` (see ddfast.ops.anchor_distances).

    The vectorised GEMM form a PyTorch user would write: with features and anchors centred on the mean
    anchor ``m`` (distances are translation invariant; centring limits cancellation),
    ``d^T P d = f^T P f - f^T P mu - mu^T P f + mu^T P mu``; clamped at 0.
    """
    f = features
    a = anchors
    center = a.mean(dim=0) if a.shape[0] > 0 else torch.zeros_like(a[0:1].sum(0))
    fc = f - center
    ac = a - center
    if precision is None:
        maha = (fc * fc).sum(1, keepdim=True) - 2.0 * fc @ ac.T + (ac * ac).sum(1).unsqueeze(0)
    else:
        yf = fc @ precision  # rows f^T P
        ya = ac @ precision  # rows mu^T P
        maha = (yf * fc).sum(1, keepdim=True) - yf @ ac.T - fc @ ya.T + (ya * ac).sum(1).unsqueeze(0)
    maha = maha.clamp_min(0)
    fn = torch.linalg.vector_norm(f, dim=1).clamp_min(eps)
    an = torch.linalg.vector_norm(a, dim=1).clamp_min(eps)
    cos = (f @ a.T) / (fn.unsqueeze(1) * an.unsqueeze(0))
    return maha, cos
