"""Pure-PyTorch references of the trajectory-matching ops (MTT / DATM / TESLA).

They are the fallback of :mod:`ddfast.ops.trajectory` (no extension, unsupported device,
``DDFAST_DISABLE_EXTENSION=1``), the oracle of the tests and the eager baseline of the benchmarks.
Inputs are ``[B, P]`` (or ``[P]``); arguments are *not* validated here beyond what the maths needs --
the public wrappers do that. Accumulation is in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

from typing import Tuple

import torch

__all__ = ["trajectory_matching_loss", "tesla_quantities", "accumulation_dtype", "check_denominator"]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything else (float32, float16, bfloat16)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_denominator(den: torch.Tensor, op: str) -> None:
    """Raises ``ValueError`` if any row has ``den == ||start - target||^2 == 0`` (the loss would be 0/0 or
    x/0). In eager mode this reads ``den`` on the host; while ``torch.compile`` traces, it becomes an
    asynchronous assertion (a ``RuntimeError`` when the compiled graph runs) so that the graph does not break;
    while a CUDA graph is being captured the check is skipped (a host read would invalidate the capture).
    """
    if den.numel() == 0:
        return
    if torch.compiler.is_compiling():
        torch._assert_async(torch.all(den != 0), f"{op}: start == target (||start - target||^2 == 0) in some row")
        return
    if den.is_cuda and torch.cuda.is_current_stream_capturing():
        return  # no host read inside CUDA graph capture (the compiled kernels skip it there too)
    bad = torch.nonzero(den == 0).flatten()  # NaN / inf rows are named by the public op's finiteness check
    if bad.numel() > 0:
        raise ValueError(
            f"{op}: start and target are identical in batch row {int(bad[0])} (||start - target||^2 == 0), "
            "so the normalised distance is undefined; pass an expert segment whose start and target differ"
        )


def trajectory_matching_terms(student: torch.Tensor, start: torch.Tensor, target: torch.Tensor):
    """``(loss, num, den)``: :func:`trajectory_matching_loss` with its numerator ``||student - target||^2`` and
    denominator ``||start - target||^2`` (accumulation dtype), as the compiled forward returns them."""
    acc = accumulation_dtype(student.dtype)
    s, e, t = student.to(acc), start.to(acc), target.to(acc)
    num = (s - t).square().sum(-1)
    den = (e - t).square().sum(-1)
    check_denominator(den, "trajectory_matching_loss")
    return (num / den).to(student.dtype), num, den


def trajectory_matching_loss(student: torch.Tensor, start: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``||student - target||^2 / ||start - target||^2`` over the last dimension (MTT eq. 2).

    ``[B, P] -> [B]`` (or ``[P] -> []``), in the inputs' dtype, accumulated in float32 (float64 for float64).
    Raises ``ValueError`` when a row has ``start == target``.
    """
    return trajectory_matching_terms(student, start, target)[0]


def tesla_quantities(start: torch.Tensor, target: torch.Tensor, grad_sum: torch.Tensor,
                     lr: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TESLA's pass-2 quantities for ``theta_N = start - lr * grad_sum`` (Cui et al. 2023).

    With ``d = start - lr * G - target`` and ``den = ||start - target||^2``:

    - ``loss     = ||d||^2 / den``                                   ``[B]``
    - ``step_vector = dL/dG = -2 lr d / den = 2 [lr (target - start) + lr^2 G] / den``   ``[B, P]``
    - ``grad_lr  = dL/dlr = -2 G . d / den``                         ``[B]``

    ``lr`` is a tensor of shape ``[B]`` (or ``[]``), broadcast over rows. Outputs in the inputs' dtype.
    """
    acc = accumulation_dtype(start.dtype)
    e, t, g = start.to(acc), target.to(acc), grad_sum.to(acc)
    a = lr.to(acc)
    a_col = a.unsqueeze(-1) if a.dim() > 0 else a
    d = e - a_col * g - t
    den = (e - t).square().sum(-1)
    check_denominator(den, "tesla_quantities")
    loss = d.square().sum(-1) / den
    scale = -2.0 * a / den
    step = (scale.unsqueeze(-1) if scale.dim() > 0 else scale) * d
    grad_lr = -2.0 * (g * d).sum(-1) / den
    return loss.to(start.dtype), step.to(start.dtype), grad_lr.to(start.dtype)
