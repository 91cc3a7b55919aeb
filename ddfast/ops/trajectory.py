"""Trajectory matching: MTT's normalised parameter distance and TESLA's constant-memory quantities.

Public: :func:`trajectory_matching_loss`, :func:`tesla_quantities` (returns :class:`TeslaQuantities`).

Both run the fused kernels ``torch.ops.ddfast.trajectory_matching_loss_forward/_backward`` and
``torch.ops.ddfast.tesla_quantities`` (one pass over the parameters forward, one backward) when the compiled
extension serves the device, and the pure-PyTorch references in :mod:`ddfast.ops._reference.trajectory`
otherwise. Autograd and fake (meta) kernels are registered here, so the ops work under ``torch.compile``
(``fullgraph=True``).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch

from .. import _extension
from . import _reference
from ._reference.trajectory import accumulation_dtype
from ._utils import FLOAT_AND_HALF_DTYPES, check_same, check_tensor

__all__ = ["trajectory_matching_loss", "tesla_quantities", "TeslaQuantities"]


class TeslaQuantities(NamedTuple):
    """What TESLA's second pass needs (see :func:`tesla_quantities`).

    Attributes:
        loss: ``[]`` or ``[B]`` -- ``||start - lr * grad_sum - target||^2 / ||start - target||^2``.
        step_vector: like ``start`` -- ``v = dL/dG = 2 [lr (target - start) + lr^2 G] / den``.
        grad_lr: ``[]`` or ``[B]`` -- ``dL/dlr = -2 G . (start - lr G - target) / den`` with ``G`` held constant.
    """

    loss: torch.Tensor
    step_vector: torch.Tensor
    grad_lr: torch.Tensor


def _check_triplet(op: str, names, tensors) -> None:
    first_name, first = names[0], tensors[0]
    for name, x in zip(names, tensors):
        check_tensor(op, name, x, dims=(1, 2), dtypes=FLOAT_AND_HALF_DTYPES)
    check_same(op, first_name, first, **{n: x for n, x in zip(names[1:], tensors[1:])})
    for name, x in zip(names[1:], tensors[1:]):
        if x.shape != first.shape:
            raise ValueError(
                f"{op}: {name} has shape {tuple(x.shape)} but {first_name} has shape {tuple(first.shape)}; "
                "they must be equal ([P] or [B, P])"
            )
    if first.shape[-1] == 0:
        raise ValueError(f"{op}: the parameter dimension P is 0 (shape {tuple(first.shape)}); the loss would be 0/0")


def _check_finite(op: str, values: torch.Tensor, names, tensors, lr: Optional[torch.Tensor] = None) -> None:
    """Raises ``ValueError`` naming the argument (and batch row) when a result row is NaN or inf -- the same on
    every backend. One host read of a boolean per call; skipped while ``torch.compile`` traces."""
    if values.numel() == 0 or torch.compiler.is_compiling():
        return
    finite = torch.isfinite(values)
    if bool(finite.all()):
        return
    row = int(torch.nonzero(~finite).flatten()[0])
    if lr is not None and not bool(torch.isfinite(lr[row])):
        raise ValueError(f"{op}: lr is NaN or inf (batch row {row})")
    for name, t in zip(names, tensors):
        if not bool(torch.isfinite(t[row]).all()):
            raise ValueError(f"{op}: {name} has NaN or inf values in batch row {row}")
    raise ValueError(f"{op}: the squared distances overflow {tensors[0].dtype} in batch row {row} although the "
                     "inputs are finite; use a wider dtype")


def trajectory_matching_loss(student: torch.Tensor, start: torch.Tensor, target: torch.Tensor, *,
                             check_finite: bool = True) -> torch.Tensor:
    r"""Normalised parameter distance of trajectory matching (MTT eq. 2; DATM, FTD, TESLA).

    .. math::

        L_b = \frac{\lVert s_b - t_b \rVert^2}{\lVert e_b - t_b \rVert^2}

    with :math:`s` the student's flat parameters after :math:`N` unrolled steps, :math:`e` the expert at
    epoch :math:`t` (the student's start) and :math:`t` the expert at epoch :math:`t + M`.

    Gradients (``L = num / den``): ``dL/ds = 2 (s - t) / den``, ``dL/dt = (-2 (s - t) + 2 L (e - t)) / den``,
    ``dL/de = -2 L (e - t) / den``. The compiled backward is one fused pass; with ``create_graph=True`` a
    differentiable composite is used instead, so double backward works.

    Args:
        student: ``Tensor[P]`` or ``Tensor[B, P]`` -- the student's parameters :math:`\hat\theta_N`.
        start: same shape -- the expert's parameters at the start epoch :math:`\theta^*_t`.
        target: same shape -- the expert's parameters at the target epoch :math:`\theta^*_{t+M}`.
            All three share one dtype (float16, bfloat16, float32 or float64) and one device; any strides.
        check_finite: raise on NaN / inf (below; default). ``False`` lets a non-finite loss through for a caller
            that handles it itself (DATM's loss gate counts such an iteration as a fault and skips its update).

    Returns:
        ``Tensor[]`` for ``[P]`` inputs, ``Tensor[B]`` for ``[B, P]`` inputs, in the inputs' dtype. Sums are
        accumulated in float32 (float64 for float64 inputs). ``B = 0`` gives an empty result.

    Raises:
        TypeError: an argument is not a tensor, or has an unsupported or mismatched dtype.
        ValueError: wrong rank, mismatched shapes or devices, ``P == 0``, a row with ``start == target``
            (``||start - target||^2 == 0``: the loss is undefined), or NaN / inf in an argument (named, with the
            row) or an overflowing sum -- never returned as NaN / inf, on every backend. Under ``torch.compile``
            the zero-distance check is an asynchronous assertion (``RuntimeError``) and the finiteness check is
            skipped.

    Example::

        >>> loss = trajectory_matching_loss(student_params, expert[start_epoch], expert[start_epoch + M])
        >>> loss.backward()
    """
    op = "trajectory_matching_loss"
    _check_triplet(op, ("student", "start", "target"), (student, start, target))
    unbatched = student.dim() == 1
    if unbatched:
        student, start, target = student.unsqueeze(0), start.unsqueeze(0), target.unsqueeze(0)
    if student.shape[0] == 0:
        out = student.new_zeros((0,)) + (student.sum(-1) + start.sum(-1) + target.sum(-1))  # keeps autograd
        return out
    if _extension.use_kernel(student, start, target):
        loss, num, den = torch.ops.ddfast.trajectory_matching_loss_forward(student, start, target)
    else:
        loss, num, den = _reference.trajectory.trajectory_matching_terms(student, start, target)
    # num and den, not the loss: inf in start alone gives a finite loss (x / inf = 0)
    if check_finite:
        _check_finite(op, (num + den).detach(), ("student", "start", "target"), (student, start, target))
    return loss.squeeze(0) if unbatched else loss


def tesla_quantities(start: torch.Tensor, target: torch.Tensor, grad_sum: torch.Tensor,
                     lr: Union[float, torch.Tensor], *, check_finite: bool = True) -> TeslaQuantities:
    r"""TESLA's constant-memory meta-gradient quantities, fused (no materialised :math:`\theta_N`).

    TESLA (Cui et al., ICML 2023) writes the student's end point as
    :math:`\theta_N = \theta_0 - \alpha G` with :math:`G = \sum_i g_i` the sum of the (detached) inner-step
    gradients, and the loss as :math:`L = \lVert \theta_0 - \alpha G - \theta^* \rVert^2 / D`,
    :math:`D = \lVert \theta_0 - \theta^* \rVert^2`. Its second pass needs, per row,

    .. math::

        v = \frac{\partial L}{\partial G} = \frac{2\,[\alpha(\theta^* - \theta_0) + \alpha^2 G]}{D},
        \qquad
        \frac{\partial L}{\partial \alpha} = -\frac{2\, G \cdot (\theta_0 - \alpha G - \theta^*)}{D}.

    Step ``i``'s contribution to the meta-gradient is then ``d/dX_i (v . g_i)`` (``g_i`` recomputed with
    ``create_graph=True``), and ``dL/dalpha`` is the learning rate's gradient. One reduction pass over
    ``(start, target, grad_sum)`` and one pass writing ``v``.

    Args:
        start: ``Tensor[P]`` or ``Tensor[B, P]`` -- :math:`\theta_0`, the expert at the start epoch.
        target: same shape -- :math:`\theta^*`, the expert at the target epoch.
        grad_sum: same shape -- :math:`G`, the sum of the inner-step gradients.
        lr: a float, a 0-d tensor or a ``Tensor[B]`` -- the student learning rate :math:`\alpha`.
        check_finite: as :func:`trajectory_matching_loss`.

    Returns:
        :class:`TeslaQuantities` ``(loss [] | [B], step_vector like start, grad_lr [] | [B])`` in ``start``'s
        dtype (accumulated in float32, float64 for float64). ``grad_lr`` is per row; with one ``lr`` shared by
        the rows of a batch, its gradient is ``grad_lr.sum()``. The outputs are not differentiable (they are
        already derivatives); inputs are detached.

    Raises:
        TypeError / ValueError: as :func:`trajectory_matching_loss` (naming the argument); ``lr`` of the wrong
        shape or device, or NaN / inf; a row with ``start == target``; NaN / inf in ``start``, ``target`` or
        ``grad_sum`` (named).
    """
    op = "tesla_quantities"
    _check_triplet(op, ("start", "target", "grad_sum"), (start, target, grad_sum))
    unbatched = start.dim() == 1
    rows = 1 if unbatched else start.shape[0]
    acc = accumulation_dtype(start.dtype)
    if isinstance(lr, (int, float)) and not isinstance(lr, bool):
        lr_t = torch.full((rows,), float(lr), dtype=acc, device=start.device)
    elif isinstance(lr, torch.Tensor):
        if not lr.is_floating_point():
            raise TypeError(f"{op}: lr must be a floating-point tensor or a float, got dtype {lr.dtype}")
        if lr.dim() == 0 or (lr.dim() == 1 and lr.shape[0] == 1):
            lr_t = lr.detach().reshape(()).to(device=start.device, dtype=acc).expand(rows)
        elif lr.dim() == 1 and lr.shape[0] == rows and not unbatched:
            if lr.device != start.device:
                raise ValueError(f"{op}: lr is on {lr.device} but start is on {start.device}")
            lr_t = lr.detach().to(acc)
        else:
            raise ValueError(f"{op}: lr must be a float, a 0-d tensor or a tensor of shape [B] = [{rows}], "
                             f"got shape {tuple(lr.shape)}")
    else:
        raise TypeError(f"{op}: lr must be a float or a tensor, got {type(lr).__name__}")
    start, target, grad_sum = start.detach(), target.detach(), grad_sum.detach()
    if unbatched:
        start, target, grad_sum = start.unsqueeze(0), target.unsqueeze(0), grad_sum.unsqueeze(0)
    if rows == 0:
        empty = start.new_zeros((0,))
        return TeslaQuantities(empty, start.new_zeros(start.shape), empty.clone())
    if _extension.use_kernel(start, target, grad_sum):
        loss, step, grad_lr = torch.ops.ddfast.tesla_quantities(start, target, grad_sum, lr_t.contiguous())
    else:
        loss, step, grad_lr = _reference.trajectory.tesla_quantities(start, target, grad_sum, lr_t)
    if check_finite:
        _check_finite(op, torch.stack([loss, grad_lr]).sum(0), ("start", "target", "grad_sum"),
                      (start, target, grad_sum), lr=lr_t)
    if unbatched:
        loss, step, grad_lr = loss.squeeze(0), step.squeeze(0), grad_lr.squeeze(0)
    return TeslaQuantities(loss, step, grad_lr)


# ---------------------------------------------------------------------------------------------------
# Registration: fake kernels and autograd for the compiled ops (only when ddfast._C is loaded).
# ---------------------------------------------------------------------------------------------------

def _composite_grads(grad_loss, student, start, target, mask):
    """Differentiable formulas (used for double backward)."""
    acc = accumulation_dtype(student.dtype)
    s, e, t = student.to(acc), start.to(acc), target.to(acc)
    st, et = s - t, e - t
    num, den = st.square().sum(-1), et.square().sum(-1)
    loss = num / den
    g = (grad_loss.to(acc) / den).unsqueeze(-1)
    ds = 2.0 * st * g if mask[0] else None
    de = -2.0 * loss.unsqueeze(-1) * et * g if mask[1] else None
    dt = (-2.0 * st + 2.0 * loss.unsqueeze(-1) * et) * g if mask[2] else None
    cast = lambda x: None if x is None else x.to(student.dtype)  # noqa: E731
    return cast(ds), cast(de), cast(dt)


def _register() -> None:
    lib = "ddfast::"

    @torch.library.register_fake(lib + "trajectory_matching_loss_forward")
    def _traj_fwd_fake(student, start, target):
        torch._check(student.dim() == 2, lambda: "student must be [B, P]")
        torch._check(start.shape == student.shape and target.shape == student.shape, lambda: "shape mismatch")
        acc = accumulation_dtype(student.dtype)
        b = student.shape[0]
        return student.new_empty((b,)), student.new_empty((b,), dtype=acc), student.new_empty((b,), dtype=acc)

    @torch.library.register_fake(lib + "trajectory_matching_loss_backward")
    def _traj_bwd_fake(grad_loss, student, start, target, num, den, output_mask):
        return tuple(x.new_empty(x.shape) if m else x.new_empty((0,))
                     for x, m in zip((student, start, target), output_mask))

    @torch.library.register_fake(lib + "tesla_quantities")
    def _tesla_fake(start, target, grad_sum, lr):
        torch._check(start.dim() == 2, lambda: "start must be [B, P]")
        b = start.shape[0]
        return start.new_empty((b,)), start.new_empty(start.shape), start.new_empty((b,))

    def _setup(ctx, inputs, output):
        student, start, target = inputs
        _, num, den = output
        ctx.save_for_backward(student, start, target, num, den)
        ctx.mark_non_differentiable(num, den)

    def _backward(ctx, grad_loss, _grad_num, _grad_den):
        student, start, target, num, den = ctx.saved_tensors
        mask = [bool(m) for m in ctx.needs_input_grad[:3]]
        if not any(mask):
            return None, None, None
        if torch.is_grad_enabled():  # create_graph=True: a differentiable composite
            return _composite_grads(grad_loss, student, start, target, mask)
        ds, de, dt = torch.ops.ddfast.trajectory_matching_loss_backward(
            grad_loss, student, start, target, num, den, mask)
        return (ds if mask[0] else None, de if mask[1] else None, dt if mask[2] else None)

    torch.library.register_autograd(lib + "trajectory_matching_loss_forward", _backward, setup_context=_setup)


if _extension.has_extension():
    _register()
