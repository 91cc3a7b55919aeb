"""Per-sample trust scoring for trust-aware diversion (TAD, arXiv 2502.05027).

Three ops, each a compiled kernel (``torch.ops.ddfast.*``, CPU and CUDA) with a pure-PyTorch reference
(:mod:`ddfast.ops._reference.trust`) that serves when the extension is missing, the device has no kernel,
or ``DDFAST_DISABLE_EXTENSION=1``:

- :func:`sample_stats` -- per-sample cross-entropy, confidence, margin and prediction from logits, with an
  optional in-place EMA of the loss (TAD's "dynamic" loss);
- :func:`classwise_gmm` -- a two-component 1-D Gaussian mixture per class fitted by EM on those losses
  (the DivideMix-style loss GMM; TAD's outer loop, low-mean component = trusted);
- :func:`anchor_distances` -- squared Mahalanobis distance and cosine similarity of features to class
  anchors (TAD's inner loop).

Value checks that need to read the data (labels in range, finite values, NaN results) run in eager mode
only; under ``torch.compile`` the kernels' own guards apply (the CPU kernels raise on labels out of range,
the CUDA kernels give NaN rows). None of these ops is differentiable except :func:`anchor_distances`;
:func:`sample_stats` and :func:`classwise_gmm` raise if asked to record a graph.
"""
from __future__ import annotations

import numbers
from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from .._extension import has_extension, use_kernel
from ._reference import trust as _ref
from ._utils import FLOAT_AND_HALF_DTYPES, FLOAT_DTYPES, check_same, check_tensor

__all__ = [
    "SampleStats",
    "GMMFit",
    "AnchorDistances",
    "sample_stats",
    "classwise_gmm",
    "anchor_distances",
]

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
_OPS = ("sample_stats", "sample_stats_ema_", "classwise_gmm", "anchor_distances")


class SampleStats(NamedTuple):
    """Output of :func:`sample_stats`; every field is ``[N]``."""

    loss: Tensor
    confidence: Tensor
    margin: Tensor
    prediction: Tensor


class GMMFit(NamedTuple):
    """Output of :func:`classwise_gmm`: ``posterior_low [N]``, ``weights/means/variances [C, 2]``."""

    posterior_low: Tensor
    weights: Tensor
    means: Tensor
    variances: Tensor


class AnchorDistances(NamedTuple):
    """Output of :func:`anchor_distances`; both fields are ``[N, C]``."""

    mahalanobis_sq: Tensor
    cosine: Tensor


# --------------------------------------------------------------------------------------------------
# dispatch: which ops have a compiled kernel for which device (decided once, at import)
# --------------------------------------------------------------------------------------------------
def _kernel_table():
    table = {}
    if not has_extension():
        return table
    for name in _OPS:
        qual = f"ddfast::{name}"
        try:
            table[name] = {
                "cpu": torch._C._dispatch_has_kernel_for_dispatch_key(qual, "CPU"),
                "cuda": torch._C._dispatch_has_kernel_for_dispatch_key(qual, "CUDA"),
                "meta": True,
            }
        except RuntimeError:  # schema missing (an older build of _C)
            pass
    return table


_KERNELS = _kernel_table()


def _use_kernel(name: str, device: torch.device, *tensors) -> bool:
    return use_kernel(*tensors) and _KERNELS.get(name, {}).get(device.type, False)


def _eager() -> bool:
    return not torch.compiler.is_compiling()


def _no_grad_check(op: str, **tensors):
    if torch.is_grad_enabled():
        for name, t in tensors.items():
            if t is not None and t.requires_grad:
                raise RuntimeError(
                    f"{op}: {name} requires grad, but {op} is not differentiable (TAD uses it without "
                    f"gradients); call it under torch.no_grad() or pass {name}.detach()"
                )


def _check_labels(op: str, labels, n: int, ref: Tensor, ref_name: str):
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{op}: labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in _INT_DTYPES:
        raise TypeError(f"{op}: labels must be an integer tensor (int64 preferred), got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"{op}: labels must have shape ({n},) to match {ref_name}, got {tuple(labels.shape)}")
    if labels.device != ref.device:
        raise ValueError(f"{op}: labels is on {labels.device} but {ref_name} is on {ref.device}")


def _check_label_range(op: str, labels: Tensor, num_classes: int):
    if labels.numel() and _eager():
        lo, hi = torch.aminmax(labels)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"{op}: labels must lie in [0, {num_classes}); found values in [{lo}, {hi}]")


def _real(op: str, name: str, v, *, lo=None, lo_open=False, hi=None) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{op}: {name} must be a real number, got {type(v).__name__}")
    v = float(v)
    bad = v != v or v in (float("inf"), float("-inf"))
    if lo is not None and (v < lo or (lo_open and v == lo)):
        bad = True
    if hi is not None and v > hi:
        bad = True
    if bad:
        rng = f"{'(' if lo_open else '['}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise ValueError(f"{op}: {name} must be finite and in {rng}, got {v}")
    return v


def _int(op: str, name: str, v, *, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{op}: {name} must be an int, got {type(v).__name__}")
    if v < lo:
        raise ValueError(f"{op}: {name} must be >= {lo}, got {v}")
    return int(v)


# --------------------------------------------------------------------------------------------------
# sample_stats
# --------------------------------------------------------------------------------------------------
def sample_stats(logits: Tensor, labels: Tensor, *, ema: Optional[Tensor] = None,
                 momentum: float = 0.9) -> SampleStats:
    r"""Per-sample cross-entropy, confidence, margin and prediction in one read of the logits.

    For each row :math:`z \in \mathbb{R}^C` of ``logits`` with label :math:`y`, :math:`p = \mathrm{softmax}(z)`:

    .. math::
        \mathrm{loss} = \log\sum_k e^{z_k} - z_y, \qquad
        \mathrm{confidence} = p_y, \qquad
        \mathrm{margin} = p_y - \max_{k \neq y} p_k, \qquad
        \mathrm{prediction} = \arg\max_k z_k .

    The kernel reads each row once (max / first-argmax / max over the other classes, then the sum of
    exponentials on the cached row: an online softmax). With ``ema`` given, it also updates, in place,

    .. math::
        \mathrm{ema} \leftarrow m\,\mathrm{ema} + (1 - m)\,\mathrm{loss}, \qquad m = \texttt{momentum},

    TAD's "dynamic" loss smoothed over rounds (arXiv 2502.05027, outer loop); feed ``ema`` to
    :func:`classwise_gmm`.

    Args:
        logits (Tensor[N, C]): float16, bfloat16, float32 or float64; any strides (rows whose elements are
            not contiguous are copied first). ``C >= 1``. ``-inf`` entries (masked classes) are allowed.
        labels (Tensor[N]): integer class of each row, in ``[0, C)``.
        ema (Tensor[N], optional): float32 or float64 running loss, updated in place (any stride). Must not
            require grad.
        momentum (float): :math:`m \in [0, 1]`; ``ema`` keeps this share of its old value. Default 0.9.

    Returns:
        SampleStats(loss, confidence, margin, prediction): ``[N]`` each. ``loss``, ``confidence`` and
        ``margin`` are float64 for float64 logits and float32 otherwise (float16/bfloat16 logits are
        accumulated in float32 and the results stay float32); ``prediction`` is int64.

    Conventions:
        - Ties in the argmax resolve to the first maximal index, as :func:`torch.argmax`.
        - ``C == 1``: there is no other class, its probability is taken as 0: ``loss = 0``,
          ``confidence = 1``, ``margin = 1``, ``prediction = 0``.
        - A label whose logit is ``-inf`` gives ``loss = inf``, ``confidence = 0``.

    Raises:
        TypeError: wrong tensor type or dtype (logits, labels, ema), non-real momentum.
        ValueError: wrong rank or shape, devices differ, ``C == 0``, labels outside ``[0, C)``, momentum
            outside ``[0, 1]``, or a row of logits containing NaN or ``+inf`` or only ``-inf`` (its loss would
            be NaN; ``ema``, if given, has then already been updated).
        RuntimeError: ``logits`` (or ``ema``) requires grad while grad mode is on (the op has no gradient).

    Example::

        >>> z = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 3.0]]); y = torch.tensor([0, 2])
        >>> s = sample_stats(z, y)
        >>> s.prediction     # first maximal index on ties
        tensor([0, 1])
    """
    op = "sample_stats"
    check_tensor(op, "logits", logits, dims=(2,), dtypes=FLOAT_AND_HALF_DTYPES)
    n, c = logits.shape
    if c == 0:
        raise ValueError(f"{op}: logits needs at least one class (C >= 1), got shape {tuple(logits.shape)}")
    _check_labels(op, labels, n, logits, "logits")
    _no_grad_check(op, logits=logits, ema=ema)
    if ema is not None:
        check_tensor(op, "ema", ema, dims=(1,), dtypes=FLOAT_DTYPES)
        if ema.shape[0] != n:
            raise ValueError(f"{op}: ema must have shape ({n},) to match logits, got {tuple(ema.shape)}")
        if ema.device != logits.device:
            raise ValueError(f"{op}: ema is on {ema.device} but logits is on {logits.device}")
        if ema.requires_grad:
            raise ValueError(f"{op}: ema is updated in place and must not require grad")
        if n > 1 and ema.stride(0) == 0:
            raise ValueError(f"{op}: ema has overlapping memory (stride 0, e.g. an expanded tensor) and is updated "
                             "in place; pass a tensor with one element per row (.clone())")
        momentum = _real(op, "momentum", momentum, lo=0.0, hi=1.0)
    _check_label_range(op, labels, c)
    if labels.dtype != torch.int64:
        labels = labels.long()
    dev = logits.device
    if ema is None:
        if _use_kernel("sample_stats", dev, logits, labels):
            out = torch.ops.ddfast.sample_stats(logits, labels)
        else:
            out = _ref.sample_stats(logits, labels)
    else:
        if _use_kernel("sample_stats_ema_", dev, logits, labels, ema):
            out = torch.ops.ddfast.sample_stats_ema_(logits, labels, ema, momentum)
        else:
            out = _ref.sample_stats_ema_(logits, labels, ema, momentum)
    if n and _eager():
        bad = torch.isnan(out[0])
        if bool(bad.any()):
            rows = bad.nonzero().flatten()[:5].tolist()
            raise ValueError(
                f"{op}: logits has rows with NaN, +inf or only -inf entries (their loss is undefined), "
                f"e.g. rows {rows}"
            )
    return SampleStats(*out)


# --------------------------------------------------------------------------------------------------
# classwise_gmm
# --------------------------------------------------------------------------------------------------
def _check_init(op: str, init, num_classes: int, values: Tensor):
    if not isinstance(init, (tuple, list)) or len(init) != 3:
        raise TypeError(f"{op}: init must be 'mean_split', 'minmax' or a (weights, means, variances) tuple")
    out = []
    for name, t in zip(("init weights", "init means", "init variances"), init):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor")
        if tuple(t.shape) != (num_classes, 2):
            raise ValueError(f"{op}: {name} must have shape ({num_classes}, 2), got {tuple(t.shape)}")
        if t.device != values.device:
            raise ValueError(f"{op}: {name} is on {t.device} but values is on {values.device}")
        out.append(t.detach().to(values.dtype).contiguous())
    w, mu, var = out
    if _eager():
        if not bool(torch.isfinite(w).all() & (w >= 0).all()):
            raise ValueError(f"{op}: init weights must be finite and >= 0")
        if not bool(((w.double().sum(1) - 1).abs() <= 1e-5).all()):
            raise ValueError(f"{op}: each row of init weights must sum to 1")
        if not bool(torch.isfinite(mu).all()):
            raise ValueError(f"{op}: init means must be finite")
        if not bool((torch.isfinite(var) & (var > 0)).all()):
            raise ValueError(f"{op}: init variances must be finite and > 0")
    return w, mu, var


def classwise_gmm(values: Tensor, labels: Tensor, num_classes: int, num_iters: int = 100, *,
                  tol: float = 1e-3, reg_covar: float = 1e-6,
                  init: Union[str, Sequence[Tensor]] = "mean_split") -> GMMFit:
    r"""Per class, a two-component 1-D Gaussian mixture fitted by EM; all classes in one call.

    For each class :math:`c`, on the values :math:`x_i` of the samples with ``labels[i] == c``, EM fits

    .. math::
        p(x) = w_0\,\mathcal{N}(x \mid \mu_0, \sigma_0^2) + w_1\,\mathcal{N}(x \mid \mu_1, \sigma_1^2),

    exactly as scikit-learn's ``GaussianMixture(2, covariance_type="full" | "spherical", tol=tol,
    reg_covar=reg_covar, max_iter=num_iters, weights_init=..., means_init=..., precisions_init=1/var)``
    fitted on that class alone: each iteration is an E-step with the current parameters (responsibilities
    :math:`r_{ik}` and the mean log-likelihood :math:`\ell`), then the M-step

    .. math::
        n_k = \textstyle\sum_i r_{ik} + 10\epsilon,\quad \mu_k = \frac{\sum_i r_{ik} x_i}{n_k},\quad
        \sigma_k^2 = \frac{\sum_i r_{ik}(x_i - \mu_k)^2}{n_k} + \texttt{reg\_covar},\quad
        w_k = \frac{n_k}{n_0 + n_1}

    (:math:`\epsilon` the machine epsilon of ``values``' dtype). **Convergence**, per class as scikit-learn:
    the class stops after the first iteration whose :math:`|\ell_t - \ell_{t-1}| <` ``tol`` (:math:`\ell_0 =
    -\infty`), keeping that iteration's M-step, or after ``num_iters`` iterations; ``tol=0`` runs exactly
    ``num_iters``. Finally the components are ordered so that component 0 has the lower mean, and a last
    E-step with the final parameters gives ``posterior_low[i]``, sample i's responsibility of the
    low-mean component of its class. Used on per-sample losses this is the DivideMix-style loss GMM
    (Li et al., ICLR 2020) that TAD (arXiv 2502.05027) fits per class: low-loss component = trusted.

    **Initialisation** (deterministic), ``init=``:

    - ``"mean_split"`` (default): split each class at its mean; component 0 = the values ``<= mean``,
      component 1 = the rest; weights = group fractions, means = group means, variances = group
      variances + ``reg_covar`` (one Lloyd step of 2-means; robust to the outliers that a min/max start
      chases, and it separates a majority from a minority mode from the start).
    - ``"minmax"``: weights ``(1/2, 1/2)``, means ``(min, max)`` of the class, both variances = the class
      variance + ``reg_covar``.
    - a tuple ``(weights, means, variances)`` of ``[C, 2]`` tensors (rows of weights sum to 1,
      variances > 0), e.g. the previous round's fit (warm start).

    **Degenerate classes** (never NaN): a class with fewer than 2 samples is not fitted (its parameters
    stay the initial ones; scikit-learn refuses such a fit). The built-in initialisations give a class
    with no samples weights ``(1/2, 1/2)``, means ``(0, 0)``, variances ``(reg_covar, reg_covar)``, and a
    class whose values are all equal (a single sample included) two identical components at that value
    with variance ``reg_covar``, which EM keeps: its samples get ``posterior_low = 1/2`` (no evidence either
    way). Components whose means differ by less than 1e-3 standard deviations (the larger of the two) are
    indistinguishable and keep their EM order instead of being sorted, so that rounding (float32 sums in
    another order, another backend) never decides which one is "low"; e.g. values around 1e-12 with
    ``reg_covar=1e-6`` give such a tie.

    Args:
        values (Tensor[N]): float32 or float64, finite (e.g. :func:`sample_stats`' loss or its EMA); any
            stride.
        labels (Tensor[N]): integer class of each value, in ``[0, num_classes)``.
        num_classes (int): C >= 1.
        num_iters (int): maximum EM iterations per class (scikit-learn's ``max_iter``); 0 returns the
            initialisation. Default 100.
        tol (float): convergence threshold on the change of the mean log-likelihood, >= 0. Default 1e-3.
        reg_covar (float): added to every variance, > 0. Default 1e-6 (both scikit-learn's defaults; DivideMix
            uses ``num_iters=10, tol=1e-2, reg_covar=5e-4`` on losses min-max normalised to [0, 1]).
        init: see above.

    Returns:
        GMMFit(posterior_low [N], weights [C, 2], means [C, 2], variances [C, 2]) in ``values``' dtype,
        component 0 the lower-mean one. The per-class iteration counts are the fifth output of
        ``torch.ops.ddfast.classwise_gmm`` (and of the reference).

    Raises:
        TypeError: wrong tensor type or dtype, non-integer ``num_classes``/``num_iters``, bad ``init`` type.
        ValueError: wrong shapes, devices differ, labels out of range, NaN/inf in ``values``, ``tol < 0``,
            ``reg_covar <= 0``, an unknown init method or an invalid explicit init.
        RuntimeError: ``values`` requires grad while grad mode is on (the op has no gradient).
    """
    op = "classwise_gmm"
    check_tensor(op, "values", values, dims=(1,), dtypes=FLOAT_DTYPES)
    n = values.shape[0]
    _check_labels(op, labels, n, values, "values")
    C = _int(op, "num_classes", num_classes, lo=1)
    num_iters = _int(op, "num_iters", num_iters, lo=0)
    tol = _real(op, "tol", tol, lo=0.0)
    reg_covar = _real(op, "reg_covar", reg_covar, lo=0.0, lo_open=True)
    _no_grad_check(op, values=values)
    _check_label_range(op, labels, C)
    if n and _eager() and not bool(torch.isfinite(values).all()):
        raise ValueError(f"{op}: values contains NaN or inf; the mixture fit needs finite values")
    if labels.dtype != torch.int64:
        labels = labels.long()
    if isinstance(init, str):
        w, mu, var = _ref.gmm_init(values.detach(), labels, C, init, reg_covar)
    else:
        w, mu, var = _check_init(op, init, C, values)
    args = (values, labels, C, num_iters, tol, reg_covar, w, mu, var)
    if _use_kernel(op, values.device, values, labels):
        out = torch.ops.ddfast.classwise_gmm(*args)
    else:
        out = _ref.classwise_gmm(*args)
    return GMMFit(out[0], out[1], out[2], out[3])


# --------------------------------------------------------------------------------------------------
# anchor_distances
# --------------------------------------------------------------------------------------------------
def anchor_distances(features: Tensor, anchors: Tensor, precision: Optional[Tensor] = None, *,
                     eps: float = 1e-8) -> AnchorDistances:
    r"""Squared Mahalanobis distance and cosine similarity of every feature to every class anchor.

    .. math::
        \mathrm{mahalanobis\_sq}_{ic} = (f_i - \mu_c)^\top P\,(f_i - \mu_c), \qquad
        \mathrm{cosine}_{ic} = \frac{f_i \cdot \mu_c}{\max(\lVert f_i\rVert, \varepsilon)\,
        \max(\lVert \mu_c\rVert, \varepsilon)},

    with :math:`P` = ``precision`` (typically the inverse of a shrunk pooled covariance of trusted
    features), or the identity when ``precision`` is None (squared Euclidean distance). A zero vector has
    cosine 0 with everything. TAD's inner loop (arXiv 2502.05027) ranks untrusted samples by these to class
    anchors (Mahalanobis, 1936; as in feature-space OOD scoring, Lee et al., NeurIPS 2018).

    Computation: the Euclidean case is a direct kernel (no cancellation). With a precision, the O(N D^2)
    part is one GEMM on features centred on the mean anchor, ``Y = (F - m) P``, and each entry is then
    computed directly as :math:`((y_i - z_c) \cdot (f_i - \mu_c))` with ``z_c = (mu_c - m) P`` -- the error is
    relative to :math:`\lVert f_i - \mu_c\rVert` rather than to :math:`\lVert f_i\rVert^2` as in the expanded
    form. Results are clamped at 0.

    Args:
        features (Tensor[N, D]): float32 or float64; any strides.
        anchors (Tensor[C, D]): class anchors (e.g. trusted class means); features' dtype and device.
        precision (Tensor[D, D], optional): symmetric positive semi-definite -- the caller's promise, not
            checked (an indefinite P gives clamped, meaningless distances). For a non-symmetric P the value is
            that of its symmetric part.
        eps (float): floor of the norms in the cosine, > 0. Default 1e-8.

    Returns:
        AnchorDistances(mahalanobis_sq [N, C], cosine [N, C]) in features' dtype.

    Gradients: with respect to ``features``, ``anchors`` and ``precision`` (analytic backward composed of
    PyTorch ops; the clamp at 0 is not differentiated, the norm floor is), e.g. for
    :math:`\partial\,\mathrm{mahalanobis\_sq}_{ic}/\partial f_i = (P + P^\top)(f_i - \mu_c)`.

    Raises:
        TypeError: non-tensor inputs or a dtype other than float32/float64, dtypes that differ.
        ValueError: wrong ranks, feature dimensions that differ, a precision that is not ``[D, D]``, devices
            that differ, ``eps <= 0``; NaN or inf in an input (named) or distances that overflow (never returned
            as NaN / inf; one host read of a boolean per call).
    """
    op = "anchor_distances"
    check_tensor(op, "features", features, dims=(2,), dtypes=FLOAT_DTYPES)
    check_tensor(op, "anchors", anchors, dims=(2,), dtypes=FLOAT_DTYPES)
    d = features.shape[1]
    if anchors.shape[1] != d:
        raise ValueError(
            f"{op}: anchors must be [C, {d}] to match features [N, {d}], got {tuple(anchors.shape)}"
        )
    check_same(op, "features", features, anchors=anchors)
    if precision is not None:
        check_tensor(op, "precision", precision, dims=(2,), dtypes=FLOAT_DTYPES)
        if tuple(precision.shape) != (d, d):
            raise ValueError(f"{op}: precision must be square [{d}, {d}], got {tuple(precision.shape)}")
        check_same(op, "features", features, precision=precision)
    eps = _real(op, "eps", eps, lo=0.0, lo_open=True)
    if _use_kernel(op, features.device, features, anchors, precision):
        out = torch.ops.ddfast.anchor_distances(features, anchors, precision, eps)
    else:
        out = _ref.anchor_distances(features, anchors, precision, eps)
    if not torch.compiler.is_compiling() and out[0].numel() and not bool(
            torch.isfinite(out[0]).all() & torch.isfinite(out[1]).all()):
        for name, t in (("features", features), ("anchors", anchors), ("precision", precision)):
            if t is not None and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{op}: {name} has NaN or inf values")
        raise ValueError(f"{op}: the distances overflow {features.dtype} although the inputs are finite; use "
                         "float64 or smaller features")
    return AnchorDistances(out[0], out[1])


def _anchor_distances_backward_impl(grad_maha, grad_cos, features, anchors, precision, eps, cos):
    """Analytic gradients of :func:`anchor_distances` (PyTorch ops only; also used by the tests)."""
    f, a = features, anchors
    need_f, need_a, need_p = True, True, precision is not None
    gf = ga = gp = None
    zero = grad_maha is None and grad_cos is None
    if zero:
        return None, None, None
    if grad_maha is not None:
        gm = grad_maha
        r = gm.sum(1)  # [N]
        k = gm.sum(0)  # [C]
        bf = r.unsqueeze(1) * f - gm @ a  # sum_c gm_ic (f_i - mu_c)    [N, D]
        ba = gm.T @ f - k.unsqueeze(1) * a  # sum_i gm_ic (f_i - mu_c)  [C, D]
        if precision is None:
            gf = 2.0 * bf
            ga = -2.0 * ba
        else:
            s = precision + precision.T
            gf = bf @ s
            ga = -(ba @ s)
            # sum_ic gm_ic d_ic d_ic^T
            gp = (f.T * r) @ f - f.T @ (gm @ a) - (gm @ a).T @ f + (a.T * k) @ a
    if grad_cos is not None:
        gc = grad_cos
        fnorm = torch.linalg.vector_norm(f, dim=1)
        anorm = torch.linalg.vector_norm(a, dim=1)
        fn = fnorm.clamp_min(eps)
        an = anorm.clamp_min(eps)
        A = gc / (fn.unsqueeze(1) * an.unsqueeze(0))
        gcos = gc * cos
        sf = torch.where(fnorm >= eps, gcos.sum(1) / (fnorm * fnorm).clamp_min(eps * eps), torch.zeros_like(fnorm))
        sa = torch.where(anorm >= eps, gcos.sum(0) / (anorm * anorm).clamp_min(eps * eps), torch.zeros_like(anorm))
        cf = A @ a - sf.unsqueeze(1) * f
        ca = A.T @ f - sa.unsqueeze(1) * a
        gf = cf if gf is None else gf + cf
        ga = ca if ga is None else ga + ca
    return (gf if need_f else None), (ga if need_a else None), (gp if need_p else None)


# --------------------------------------------------------------------------------------------------
# fake kernels (torch.compile) and autograd, registered once the ops exist
# --------------------------------------------------------------------------------------------------
def _register():
    if not _KERNELS:
        return
    from ._reference.trust import acc_dtype

    if "sample_stats" in _KERNELS:

        @torch.library.register_fake("ddfast::sample_stats")
        def _sample_stats_fake(logits, labels):
            n = logits.shape[0]
            acc = acc_dtype(logits.dtype)
            mk = lambda dt: logits.new_empty((n,), dtype=dt)  # noqa: E731
            return mk(acc), mk(acc), mk(acc), mk(torch.int64)

    if "sample_stats_ema_" in _KERNELS:

        @torch.library.register_fake("ddfast::sample_stats_ema_")
        def _sample_stats_ema_fake(logits, labels, ema, momentum):
            n = logits.shape[0]
            acc = acc_dtype(logits.dtype)
            mk = lambda dt: logits.new_empty((n,), dtype=dt)  # noqa: E731
            return mk(acc), mk(acc), mk(acc), mk(torch.int64)

    if "classwise_gmm" in _KERNELS:

        @torch.library.register_fake("ddfast::classwise_gmm")
        def _classwise_gmm_fake(values, labels, num_classes, num_iters, tol, reg_covar, w, mu, var):
            c = num_classes
            return (
                values.new_empty((values.shape[0],)),
                values.new_empty((c, 2)),
                values.new_empty((c, 2)),
                values.new_empty((c, 2)),
                values.new_empty((c,), dtype=torch.int64),
            )

    if "anchor_distances" in _KERNELS:

        @torch.library.register_fake("ddfast::anchor_distances")
        def _anchor_distances_fake(features, anchors, precision, eps):
            shape = (features.shape[0], anchors.shape[0])
            return features.new_empty(shape), features.new_empty(shape)

        def _setup_context(ctx, inputs, output):
            features, anchors, precision, eps = inputs
            ctx.eps = eps
            ctx.has_precision = precision is not None
            saved = (features, anchors, output[1]) + ((precision,) if precision is not None else ())
            ctx.save_for_backward(*saved)

        def _backward(ctx, grad_maha, grad_cos):
            saved = ctx.saved_tensors
            features, anchors, cos = saved[:3]
            precision = saved[3] if ctx.has_precision else None
            gf, ga, gp = _anchor_distances_backward_impl(grad_maha, grad_cos, features, anchors, precision,
                                                         ctx.eps, cos)
            need = ctx.needs_input_grad
            return (gf if need[0] else None, ga if need[1] else None,
                    gp if (len(need) > 2 and need[2]) else None, None)

        torch.library.register_autograd("ddfast::anchor_distances", _backward, setup_context=_setup_context)


_register()
