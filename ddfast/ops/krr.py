"""Batched linear-kernel ridge regression by Cholesky (RCIG's closed-form last layer).

Public:

- :func:`kernel_ridge_regression` -- one call: factorise ``K_ss + ridge I`` once, predict, and reuse that
  factor in the backward.
- :func:`krr_factor` -> :class:`KRRFactor`, then :func:`krr_solve` and :func:`krr_predict` -- one
  factorisation reused across many solves with new right-hand sides (RCIG's inner and Hessian-inverse
  steps, where ``K_ss`` depends only on the support set and the frozen pool model while the right-hand side
  ``Y_s - u_s(psi)`` changes every step). Gradients flow to the right-hand side, the support features and
  the ridge, exactly as if each call had factorised afresh.

Compiled kernels ``torch.ops.ddfast.kernel_ridge_regression_*`` serve CPU and CUDA tensors when the extension
is loaded; otherwise the pure-PyTorch references of :mod:`ddfast.ops._reference.krr` run. Autograd and fake
kernels are registered here (``torch.compile(fullgraph=True)`` traces the ops). The compiled backward is
fused and first-order; when a double backward is requested (``create_graph=True``, e.g. RCIG's
Hessian-vector products) a differentiable composite built from the same registered solve op is used.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch

from .. import _extension
from . import _reference
from ._utils import FLOAT_DTYPES, check_same, check_tensor

__all__ = ["kernel_ridge_regression", "KRRFactor", "krr_factor", "krr_solve", "krr_predict"]

Ridge = Union[float, torch.Tensor]


class KRRFactor(NamedTuple):
    """A Cholesky factorisation of ``K_ss + ridge I`` (``K_ss = X_s X_s^T``), made by :func:`krr_factor`.

    Attributes:
        support_x: ``[B, n, p]`` -- the support features it was made from (kept, with their autograd history,
            so the solves can route gradients to them).
        ridge: ``[B]`` -- the ridge per system (in ``support_x``'s dtype; autograd history kept).
        cholesky: ``[B, n, n]`` -- lower-triangular ``L`` with ``L L^T = K_ss + ridge I``. Not differentiable
            on the compiled path (the solves differentiate analytically); it carries the autograd history
            on the reference path.
        batched: False when made from unbatched ``[n, p]`` features (then solves take and return unbatched
            tensors).
        system: ``[B, n, n]`` or None -- on the compiled path when ``support_x`` or ``ridge`` require grad: the
            matrix ``A = K_ss + ridge I`` as an autograd node (its value is ``L L^T``). The solves route their
            gradients to it (``dA = -beta alpha^T`` each); autograd sums them over every solve and the node's backward
            maps the sum to ``support_x`` (``(dA + dA^T) X_s``, one ``[n, n] x [n, p]`` product for all the solves)
            and to ``ridge`` (``tr dA``).
    """

    support_x: torch.Tensor
    ridge: torch.Tensor
    cholesky: torch.Tensor
    batched: bool
    system: Optional[torch.Tensor] = None


# ---------------------------------------------------------------------------------------------------
# argument handling
# ---------------------------------------------------------------------------------------------------

def _ridge_tensor(op: str, ridge: Ridge, batch: int, like: torch.Tensor, batched: bool) -> torch.Tensor:
    """``ridge`` as a ``[B]`` tensor of ``like``'s dtype and device (metadata checks; floats fully checked)."""
    if isinstance(ridge, bool):
        raise TypeError(f"{op}: ridge must be a float or a tensor, got bool")
    if isinstance(ridge, (int, float)):
        r = float(ridge)
        if not (r >= 0.0) or r == float("inf"):
            raise ValueError(f"{op}: ridge must be >= 0 and finite, got {ridge}")
        return torch.full((batch,), r, dtype=like.dtype, device=like.device)
    if not isinstance(ridge, torch.Tensor):
        raise TypeError(f"{op}: ridge must be a float or a tensor, got {type(ridge).__name__}")
    if not ridge.is_floating_point():
        raise TypeError(f"{op}: ridge must be a floating-point tensor, got dtype {ridge.dtype}")
    if ridge.dim() == 0 or (ridge.dim() == 1 and ridge.shape[0] == 1):
        if ridge.device != like.device and not (ridge.dim() == 0 and ridge.device.type == "cpu"):
            raise ValueError(f"{op}: ridge is on {ridge.device} but support_x is on {like.device}")
        return ridge.reshape(()).to(device=like.device, dtype=like.dtype).expand(batch)
    if ridge.dim() == 1 and batched and ridge.shape[0] == batch:
        if ridge.device != like.device:
            raise ValueError(f"{op}: ridge is on {ridge.device} but support_x is on {like.device}")
        return ridge.to(like.dtype)
    want = f"a float, a 0-d tensor or a tensor of shape [B] = [{batch}]" if batched else "a float or a 0-d tensor"
    raise ValueError(f"{op}: ridge must be {want}, got shape {tuple(ridge.shape)}")


def _check_support_x(op: str, support_x: torch.Tensor) -> bool:
    check_tensor(op, "support_x", support_x, dims=(2, 3), dtypes=FLOAT_DTYPES)
    return support_x.dim() == 3


def _check_rows(op: str, name: str, x: torch.Tensor, ref: torch.Tensor, batched: bool, what: str) -> None:
    """``x`` must be batched like ``ref`` with the same ``n`` (``what`` names the dimension)."""
    check_tensor(op, name, x, dims=(3,) if batched else (2,), dtypes=FLOAT_DTYPES)
    check_same(op, "support_x", ref, **{name: x})
    if batched and x.shape[0] != ref.shape[0]:
        raise ValueError(f"{op}: {name} has batch size {x.shape[0]} but support_x has {ref.shape[0]}")


def _check_query(op: str, query_x: torch.Tensor, support_x: torch.Tensor, batched: bool) -> None:
    _check_rows(op, "query_x", query_x, support_x, batched, "p")
    if query_x.shape[-1] != support_x.shape[-1]:
        raise ValueError(f"{op}: query_x has feature dimension p = {query_x.shape[-1]} but support_x has "
                         f"p = {support_x.shape[-1]} (shapes {tuple(query_x.shape)} and {tuple(support_x.shape)})")


def _check_targets(op: str, name: str, y: torch.Tensor, support_x: torch.Tensor, batched: bool) -> None:
    _check_rows(op, name, y, support_x, batched, "n")
    if y.shape[-2] != support_x.shape[-2]:
        raise ValueError(f"{op}: {name} has n = {y.shape[-2]} rows but support_x has n = {support_x.shape[-2]} "
                         f"(shapes {tuple(y.shape)} and {tuple(support_x.shape)})")


def _b(x: torch.Tensor, batched: bool) -> torch.Tensor:
    return x if batched else x.unsqueeze(0)


def _u(x: torch.Tensor, batched: bool) -> torch.Tensor:
    return x if batched else x.squeeze(0)


# ---------------------------------------------------------------------------------------------------
# public ops
# ---------------------------------------------------------------------------------------------------

def kernel_ridge_regression(support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor,
                            ridge: Ridge) -> torch.Tensor:
    r"""Batched kernel ridge regression with the linear (feature) kernel, by Cholesky (RCIG).

    .. math::

        K_{ss} = X_s X_s^\top,\quad K_{qs} = X_q X_s^\top,\quad
        \alpha = (K_{ss} + \lambda I)^{-1} Y_s,\quad \hat Y_q = K_{qs}\,\alpha

    RCIG (Loo et al., ICML 2023, eq. for ``preds_T``) solves the last layer of a linearised ConvNet in closed
    form this way, with ``X`` the penultimate features ``phi(x; theta_0)`` and ``lambda = l2_rate * n``.
    One call factorises each system once; the backward reuses that factor
    (``beta = (K_ss + lambda I)^{-1} K_qs^T G``; ``dY_s = beta``, ``dX_q = G alpha^T X_s``,
    ``dX_s = alpha G^T X_q - (beta alpha^T + alpha beta^T) X_s``, ``dlambda = -sum(beta * alpha)``), and never
    forms ``K_qs`` (products are reassociated through the ``p x C`` matrices ``X_s^T alpha``, ``X_q^T G``).

    Args:
        support_x: ``Tensor[B, n, p]`` (or ``[n, p]``) -- support features :math:`X_s`.
        support_y: ``Tensor[B, n, C]`` (or ``[n, C]``) -- support targets :math:`Y_s`.
        query_x: ``Tensor[B, m, p]`` (or ``[m, p]``) -- query features :math:`X_q`.
        ridge: ``float`` >= 0, a 0-d tensor, or ``Tensor[B]`` -- :math:`\lambda` per system
            (differentiable when a tensor).
            All tensors float32 or float64, one dtype and one device; any strides. Empty ``B``, ``n``, ``m``
            or ``C`` are allowed (``n = 0`` predicts zeros).

    Returns:
        ``Tensor[B, m, C]`` (``[m, C]`` for unbatched inputs): :math:`\hat Y_q`.

    Raises:
        TypeError: a non-tensor argument or an unsupported/mismatched dtype (float16/bfloat16 are not
            supported: the Gram matrix of 2048-8192-d features is too ill-conditioned for them).
        ValueError: wrong ranks or mismatched shapes/devices (the argument is named); a negative or non-finite
            ridge; NaN/inf in ``support_x`` or ``support_y`` (the batch index is named); ``K_ss + ridge I`` not
            positive definite (the batch index and the failing leading minor are named). On CUDA these data
            checks cost one device-to-host copy of a ``[B]`` status vector per call.

    Example::

        >>> pred = kernel_ridge_regression(phi_support, labels_support, phi_real, ridge=5e-4 * n)  # [m, C]
    """
    op = "kernel_ridge_regression"
    batched = _check_support_x(op, support_x)
    _check_targets(op, "support_y", support_y, support_x, batched)
    _check_query(op, query_x, support_x, batched)
    xs, ys, xq = _b(support_x, batched), _b(support_y, batched), _b(query_x, batched)
    r = _ridge_tensor(op, ridge, xs.shape[0], xs, batched)
    if _extension.use_kernel(xs, ys, xq, r):
        pred = torch.ops.ddfast.kernel_ridge_regression_forward(xs, ys, xq, r)[0]
    else:
        pred = _reference.krr.kernel_ridge_regression(xs, ys, xq, r)
    return _u(pred, batched)


def krr_factor(support_x: torch.Tensor, ridge: Ridge) -> KRRFactor:
    r"""Factorises :math:`K_{ss} + \lambda I = L L^\top` once, for many :func:`krr_solve` / :func:`krr_predict`.

    In RCIG's meta-step ``K_ss`` depends only on the support set and the frozen pool model, while the inner
    steps (and the Hessian-inverse steps) change only the right-hand side ``Y_s - u_s(psi)``: factorise once
    per outer step, then solve many times at ``O(n^2 C)`` each. Gradients of the later solves reach
    ``support_x`` and ``ridge`` through the analytic formulas, so this is exactly equivalent to re-solving
    from scratch every time.

    Args:
        support_x: ``Tensor[B, n, p]`` or ``Tensor[n, p]``, float32/float64.
        ridge: ``float`` >= 0, a 0-d tensor or ``Tensor[B]``.

    Returns:
        :class:`KRRFactor` ``(support_x [B, n, p], ridge [B], cholesky [B, n, n], batched)``.
        The factor must not outlive a change of ``support_x`` (it is not refreshed).

    Raises:
        as :func:`kernel_ridge_regression` (dtype, shape, ridge, NaN/inf, not positive definite).
    """
    op = "krr_factor"
    batched = _check_support_x(op, support_x)
    xs = _b(support_x, batched)
    r = _ridge_tensor(op, ridge, xs.shape[0], xs, batched)
    if _extension.use_kernel(xs, r):
        chol = torch.ops.ddfast.kernel_ridge_regression_factor(xs.detach(), r.detach())
        system = None
        if torch.is_grad_enabled() and (xs.requires_grad or r.requires_grad) and not torch.compiler.is_compiling():
            system = _SupportSystem.apply(xs, r, chol)
        return KRRFactor(xs, r, chol, batched, system)
    chol = _reference.krr.krr_cholesky(xs, r, op)
    return KRRFactor(xs, r, chol, batched)


class _SupportSystem(torch.autograd.Function):
    """``A = X_s X_s^T + ridge I`` as an autograd node (value ``L L^T``): gradients ``dA`` from every solve against
    the factor accumulate here and reach ``X_s`` (``(dA + dA^T) X_s``) and ``ridge`` (``tr dA``) once."""

    @staticmethod
    def forward(ctx, xs, r, chol):
        ctx.save_for_backward(xs)
        return chol @ chol.mT

    @staticmethod
    def backward(ctx, dA):
        (xs,) = ctx.saved_tensors
        d_xs = (dA + dA.mT) @ xs if ctx.needs_input_grad[0] else None
        d_r = dA.diagonal(dim1=-2, dim2=-1).sum(-1) if ctx.needs_input_grad[1] else None
        return d_xs, d_r, None


class _SolveThroughSystem(torch.autograd.Function):
    """``alpha = A^{-1} rhs`` with ``A`` given by its factor, differentiable w.r.t. ``A`` (the factor's
    :class:`_SupportSystem` node: ``dA = -beta alpha^T``, ``beta = A^{-1} g``) and ``rhs`` (``beta``); its backward is
    built from this same Function, so it is differentiable again."""

    @staticmethod
    def forward(ctx, system, rhs, chol, xs, r):
        with torch._C._AutoDispatchBelowAutograd():  # this Function is the autograd: skip the op's Python wrapper
            alpha = torch.ops.ddfast.kernel_ridge_regression_solve(chol, xs, rhs, r)
        ctx.save_for_backward(system, rhs, chol, xs, r, alpha)
        return alpha

    @staticmethod
    def backward(ctx, g):
        system, rhs, chol, xs, r, alpha = ctx.saved_tensors
        if torch.is_grad_enabled():
            beta = _SolveThroughSystem.apply(system, g, chol, xs, r)
            alpha = _SolveThroughSystem.apply(system, rhs, chol, xs, r)
        else:
            with torch._C._AutoDispatchBelowAutograd():
                beta = torch.ops.ddfast.kernel_ridge_regression_solve(chol, xs, g.contiguous(), r)
        d_a = -(beta @ alpha.mT) if ctx.needs_input_grad[0] else None
        return d_a, (beta if ctx.needs_input_grad[1] else None), None, None, None


def _check_factor(op: str, factor) -> None:
    if not isinstance(factor, KRRFactor):
        raise TypeError(f"{op}: factor must be a KRRFactor from ddfast.ops.krr_factor, got {type(factor).__name__}")


def krr_solve(factor: KRRFactor, rhs: torch.Tensor) -> torch.Tensor:
    r"""``alpha = (K_ss + ridge I)^{-1} rhs`` with a precomputed :class:`KRRFactor` (two triangular solves).

    Differentiable w.r.t. ``rhs`` (``d rhs = beta = (K_ss + ridge I)^{-1} g``), ``factor.support_x``
    (``-(beta alpha^T + alpha beta^T) X_s``) and ``factor.ridge`` (``-sum(beta * alpha)``), and twice
    differentiable (the backward is built from this same solve), as RCIG's implicit gradient needs.

    Useful identities for RCIG's inner loss with ``alpha = krr_solve(f, R)``: ``R - K_ss alpha = ridge * alpha``
    and ``tr(alpha^T K_ss alpha) = sum(alpha * R) - ridge * ||alpha||^2`` -- no ``K_ss`` product needed.

    Args:
        factor: from :func:`krr_factor`.
        rhs: ``Tensor[B, n, C]`` (``[n, C]`` for an unbatched factor), same dtype/device as the factor.

    Returns:
        ``Tensor`` shaped like ``rhs``.

    Raises:
        TypeError / ValueError: not a KRRFactor; wrong rank, shape, dtype or device of ``rhs`` (named);
        NaN/inf in ``rhs`` (batch index named; on CUDA one ``[B]`` device-to-host copy per call).
    """
    op = "krr_solve"
    _check_factor(op, factor)
    _check_targets(op, "rhs", rhs, _u(factor.support_x, factor.batched), factor.batched)
    rb = _b(rhs, factor.batched)
    if factor.system is not None and _extension.use_kernel(rb, factor.cholesky):
        alpha = _SolveThroughSystem.apply(factor.system, rb, factor.cholesky, factor.support_x.detach(),
                                          factor.ridge.detach())
    elif _extension.use_kernel(rb, factor.cholesky) and not factor.cholesky.requires_grad:
        alpha = torch.ops.ddfast.kernel_ridge_regression_solve(factor.cholesky, factor.support_x, rb, factor.ridge)
    else:
        if not torch.compiler.is_compiling():
            _reference.krr.check_krr_inputs(rb.new_zeros((rb.shape[0], 0)), rb, factor.ridge, op, "rhs")
        alpha = _reference.krr.krr_cholesky_solve(factor.cholesky, rb)
    return _u(alpha, factor.batched)


def krr_predict(factor: KRRFactor, support_y: torch.Tensor, query_x: torch.Tensor) -> torch.Tensor:
    r"""``K_qs (K_ss + ridge I)^{-1} support_y`` with a precomputed :class:`KRRFactor`.

    Equals ``kernel_ridge_regression(factor.support_x, support_y, query_x, factor.ridge)`` (values and
    gradients, including w.r.t. ``factor.support_x`` and ``factor.ridge``) without refactorising.

    Args:
        factor: from :func:`krr_factor`.
        support_y: ``Tensor[B, n, C]`` (``[n, C]`` unbatched).
        query_x: ``Tensor[B, m, p]`` (``[m, p]`` unbatched).

    Returns:
        ``Tensor[B, m, C]`` (``[m, C]``).

    Raises:
        TypeError / ValueError: as :func:`krr_solve`; NaN/inf in ``support_y`` (batch index named).
    """
    op = "krr_predict"
    _check_factor(op, factor)
    xs_u = _u(factor.support_x, factor.batched)
    _check_targets(op, "support_y", support_y, xs_u, factor.batched)
    _check_query(op, query_x, xs_u, factor.batched)
    ys, xq = _b(support_y, factor.batched), _b(query_x, factor.batched)
    if _extension.use_kernel(ys, xq, factor.cholesky) and not factor.cholesky.requires_grad:
        pred = torch.ops.ddfast.kernel_ridge_regression_predict(
            factor.cholesky, factor.support_x, ys, xq, factor.ridge)[0]
    else:
        if not torch.compiler.is_compiling():
            _reference.krr.check_krr_inputs(ys.new_zeros((ys.shape[0], 0)), ys, factor.ridge, op)
        alpha = _reference.krr.krr_cholesky_solve(factor.cholesky, ys)
        pred = (xq @ factor.support_x.mT) @ alpha
    return _u(pred, factor.batched)


# ---------------------------------------------------------------------------------------------------
# Registration: fake kernels and autograd for the compiled ops (only when ddfast._C is loaded).
# ---------------------------------------------------------------------------------------------------

def _solve_op(factor, support_x, rhs, ridge):
    return torch.ops.ddfast.kernel_ridge_regression_solve(factor, support_x, rhs, ridge)


def _composite_krr_grads(grad_pred, factor, support_x, support_y, query_x, ridge, mask):
    """Differentiable backward of ``pred = X_q X_s^T A^{-1} Y`` built from the registered solve op."""
    alpha = _solve_op(factor, support_x, support_y, ridge)
    v = query_x.mT @ grad_pred                      # [B, p, C] = X_q^T G
    beta = _solve_op(factor, support_x, support_x @ v, ridge)   # A^{-1} K_qs^T G
    w = support_x.mT @ alpha                        # [B, p, C] = X_s^T alpha
    d_xs = d_y = d_xq = d_r = None
    if mask[0]:
        d_xs = alpha @ (v - support_x.mT @ beta).mT - beta @ w.mT
    if mask[1]:
        d_y = beta
    if mask[2]:
        d_xq = grad_pred @ w.mT
    if mask[3]:
        d_r = -(beta * alpha).sum((1, 2))
    return d_xs, d_y, d_xq, d_r


def _composite_solve_grads(grad_alpha, factor, support_x, rhs, ridge, mask):
    """Differentiable backward of ``alpha = A^{-1} rhs`` built from the registered solve op."""
    alpha = _solve_op(factor, support_x, rhs, ridge)
    beta = _solve_op(factor, support_x, grad_alpha, ridge)
    d_xs = d_rhs = d_r = None
    if mask[0]:
        d_xs = -(beta @ (support_x.mT @ alpha).mT + alpha @ (support_x.mT @ beta).mT)
    if mask[1]:
        d_rhs = beta
    if mask[2]:
        d_r = -(beta * alpha).sum((1, 2))
    return d_xs, d_rhs, d_r


def _register() -> None:
    lib = "ddfast::"

    @torch.library.register_fake(lib + "kernel_ridge_regression_forward")
    def _fwd_fake(support_x, support_y, query_x, ridge):
        torch._check(support_x.dim() == 3 and support_y.dim() == 3 and query_x.dim() == 3)
        b, n, _ = support_x.shape
        m, c = query_x.shape[1], support_y.shape[2]
        return support_x.new_empty((b, m, c)), support_x.new_empty((b, n, c)), support_x.new_empty((b, n, n))

    @torch.library.register_fake(lib + "kernel_ridge_regression_backward")
    def _bwd_fake(grad_pred, support_x, query_x, alpha, factor, output_mask):
        shapes = (support_x.shape, alpha.shape, query_x.shape, (support_x.shape[0],))
        return tuple(support_x.new_empty(s) if m else support_x.new_empty((0,)) for s, m in zip(shapes, output_mask))

    @torch.library.register_fake(lib + "kernel_ridge_regression_factor")
    def _factor_fake(support_x, ridge):
        b, n, _ = support_x.shape
        return support_x.new_empty((b, n, n))

    @torch.library.register_fake(lib + "kernel_ridge_regression_predict")
    def _predict_fake(factor, support_x, support_y, query_x, ridge):
        b, n, _ = support_x.shape
        m, c = query_x.shape[1], support_y.shape[2]
        return support_x.new_empty((b, m, c)), support_x.new_empty((b, n, c))

    @torch.library.register_fake(lib + "kernel_ridge_regression_solve")
    def _solve_fake(factor, support_x, rhs, ridge):
        return rhs.new_empty(rhs.shape)

    @torch.library.register_fake(lib + "kernel_ridge_regression_solve_backward")
    def _solve_bwd_fake(grad_alpha, factor, support_x, alpha, output_mask):
        shapes = (support_x.shape, alpha.shape, (support_x.shape[0],))
        return tuple(support_x.new_empty(s) if m else support_x.new_empty((0,)) for s, m in zip(shapes, output_mask))

    # -- kernel_ridge_regression_forward(support_x, support_y, query_x, ridge) -> (pred, alpha, factor)
    def _fwd_setup(ctx, inputs, output):
        support_x, support_y, query_x, ridge = inputs
        _, alpha, factor = output
        ctx.save_for_backward(support_x, support_y, query_x, ridge, alpha, factor)
        ctx.mark_non_differentiable(alpha, factor)

    def _fwd_backward(ctx, grad_pred, _grad_alpha, _grad_factor):
        support_x, support_y, query_x, ridge, alpha, factor = ctx.saved_tensors
        mask = [bool(m) for m in ctx.needs_input_grad[:4]]
        return _krr_backward(grad_pred, factor, support_x, support_y, query_x, ridge, alpha, mask)

    torch.library.register_autograd(lib + "kernel_ridge_regression_forward", _fwd_backward, setup_context=_fwd_setup)

    # -- kernel_ridge_regression_predict(factor, support_x, support_y, query_x, ridge) -> (pred, alpha)
    def _pred_setup(ctx, inputs, output):
        factor, support_x, support_y, query_x, ridge = inputs
        _, alpha = output
        ctx.save_for_backward(support_x, support_y, query_x, ridge, alpha, factor)
        ctx.mark_non_differentiable(alpha)

    def _pred_backward(ctx, grad_pred, _grad_alpha):
        support_x, support_y, query_x, ridge, alpha, factor = ctx.saved_tensors
        mask = [bool(m) for m in ctx.needs_input_grad[1:5]]
        return (None,) + _krr_backward(grad_pred, factor, support_x, support_y, query_x, ridge, alpha, mask)

    torch.library.register_autograd(lib + "kernel_ridge_regression_predict", _pred_backward, setup_context=_pred_setup)

    # -- kernel_ridge_regression_solve(factor, support_x, rhs, ridge) -> alpha
    def _solve_setup(ctx, inputs, output):
        factor, support_x, rhs, ridge = inputs
        ctx.save_for_backward(factor, support_x, rhs, ridge, output)

    def _solve_backward(ctx, grad_alpha):
        factor, support_x, rhs, ridge, alpha = ctx.saved_tensors
        mask = [bool(m) for m in ctx.needs_input_grad[1:4]]
        if not any(mask):
            return None, None, None, None
        if torch.is_grad_enabled():
            grads = _composite_solve_grads(grad_alpha, factor, support_x, rhs, ridge, mask)
        else:
            grads = torch.ops.ddfast.kernel_ridge_regression_solve_backward(grad_alpha, factor, support_x, alpha, mask)
        return (None,) + tuple(g if m else None for g, m in zip(grads, mask))

    torch.library.register_autograd(lib + "kernel_ridge_regression_solve", _solve_backward, setup_context=_solve_setup)


def _krr_backward(grad_pred, factor, support_x, support_y, query_x, ridge, alpha, mask):
    if not any(mask):
        return None, None, None, None
    if torch.is_grad_enabled():  # create_graph=True: differentiable composite
        grads = _composite_krr_grads(grad_pred, factor, support_x, support_y, query_x, ridge, mask)
    else:
        grads = torch.ops.ddfast.kernel_ridge_regression_backward(grad_pred, support_x, query_x, alpha, factor, mask)
    return tuple(g if m else None for g, m in zip(grads, mask))


if _extension.has_extension():
    _register()
