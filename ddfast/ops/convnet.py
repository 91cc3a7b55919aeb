r"""The ConvNet block's non-convolution part, fused: instance norm (affine) + activation + 2x2 average pooling.

Every distiller here (DATM/MTT/TESLA, DANCE, RCIG's pool and evaluation networks, TAD's scoring network) and the
evaluation harness spend most of their time in ConvNet-D blocks ``conv3x3 -> norm -> act -> avgpool 2x2``
(Gidaris & Komodakis, CVPR 2018, as used by DC/DSA/DM, MTT, DATM and DANCE). :func:`norm_act_pool` computes the
part after the convolution in one pass per (image, channel) plane, with a fused backward and a fused, analytic
double backward, so that DATM's unrolled inner steps (``create_graph=True``), TESLA's second pass and
Hessian-vector products run on it too.

Per plane of :math:`M = H W` pixels (:math:`\epsilon = 10^{-5}`):

.. math::

    \mu = \tfrac{1}{M}\textstyle\sum_i x_i,\quad \sigma^{-1} = (\tfrac{1}{M}\textstyle\sum_i (x_i - \mu)^2
    + \epsilon)^{-1/2},\quad \hat x_i = (x_i - \mu)\,\sigma^{-1},\quad y_i = \gamma \hat x_i + \beta,
    \quad p_j = \tfrac14 \textstyle\sum_{i \in \text{window}(j)} a(y_i)

Backward, with :math:`g_r` the upstream gradient spread over the windows (:math:`\partial L/\partial p_j / 4` on
each of its pixels) and :math:`g = g_r\, a'(y)`:

.. math::

    \partial_\beta L = \textstyle\sum g,\quad \partial_\gamma L = \textstyle\sum g \hat x,\quad
    \partial_x L = \gamma \sigma^{-1} P(g),\qquad P(v) = v - \bar v - \hat x\,\overline{v \hat x}

Double backward: the backward is a function of :math:`(g_p, x, \gamma, \beta)`; with upstream gradients
:math:`u` (of :math:`\partial_x L`), :math:`u_\gamma, u_\beta`, :math:`w = \gamma\sigma^{-1} P(u) + u_\gamma \hat x
+ u_\beta` and :math:`h = w\, g_r\, a''(y)`:

.. math::

    \partial_{g_p} = \text{pool}(a'(y)\, w),\quad \partial_\beta = \textstyle\sum h,\quad
    \partial_\gamma = \textstyle\sum h \hat x + \sigma^{-1} \textstyle\sum g P(u),\quad
    \partial_x = \sigma^{-1} P(G) - \gamma\, \sigma^{-2}\, \hat x \textstyle\sum g P(u) / M

with :math:`G = \gamma h - \gamma\sigma^{-1}(u \textstyle\sum(g\hat x)/M + \overline{u\hat x}\, g) + u_\gamma g`
(derivation: the batch-norm double backward of PyTorch's ``FunctionsManual.cpp`` specialised to one plane, plus the
activation's and the pooling's terms). The activations follow PyTorch: ReLU (:math:`a' = [y > 0]`, :math:`a''=0`)
and softplus with threshold 20. Without normalisation (``weight = bias = None``) :math:`y = x`.

The compiled kernels (``csrc/cpu/norm_act_pool_kernel.cpp``, ``csrc/cuda/norm_act_pool_kernel.cu``) serve float32
and float64 tensors on CPU and CUDA; everything else -- other dtypes, no extension, and calls under
``torch.func`` transforms (vmap, jvp, grad) or forward-mode AD, which custom ops do not support -- takes the
reference, ``ddfast.ops._reference.norm_act_pool``: the composite of ``torch.nn.functional`` ops, which autograd
differentiates to any order. Third derivatives through the compiled op raise an error.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.autograd.forward_ad as _fwad

from .. import _extension
from . import _reference
from ._utils import FLOAT_DTYPES, FLOAT_AND_HALF_DTYPES, check_same, check_tensor

__all__ = ["norm_act_pool", "ACTIVATIONS"]

ACTIVATIONS = ("relu", "softplus")
_ACT_CODE = {"relu": 0, "softplus": 1}


def _check(x, weight, bias, act, softplus_beta, pool, eps) -> None:
    op = "norm_act_pool"
    check_tensor(op, "x", x, dims=(4,), dtypes=FLOAT_AND_HALF_DTYPES)
    if (weight is None) != (bias is None):
        raise ValueError(f"{op}: weight and bias must both be given (instance norm) or both be None (no normalisation)")
    if weight is not None:
        for name, t in (("weight", weight), ("bias", bias)):
            check_tensor(op, name, t, dims=(1,), dtypes=FLOAT_AND_HALF_DTYPES)
            check_same(op, "x", x, **{name: t})
            if t.shape[0] != x.shape[1]:
                raise ValueError(f"{op}: {name} must have shape [{x.shape[1]}] (the channels of x), got "
                                 f"{tuple(t.shape)}")
        if not (isinstance(eps, (int, float)) and eps > 0):
            raise ValueError(f"{op}: eps must be a number > 0, got {eps!r}")
    if act not in ACTIVATIONS:
        raise ValueError(f"{op}: act must be one of {ACTIVATIONS}, got {act!r}")
    if act == "softplus" and not (isinstance(softplus_beta, (int, float)) and softplus_beta > 0):
        raise ValueError(f"{op}: softplus_beta must be a number > 0, got {softplus_beta!r}")
    if not isinstance(pool, bool):
        raise TypeError(f"{op}: pool must be a bool, got {type(pool).__name__}")
    if pool and (x.shape[2] < 2 or x.shape[3] < 2):
        raise ValueError(f"{op}: 2x2 pooling needs images of at least 2x2, got {tuple(x.shape[2:])}")


def _transformed(*tensors) -> bool:
    """True when a tensor is wrapped by a ``torch.func`` transform or carries a forward-mode tangent."""
    for t in tensors:
        if t is None:
            continue
        if torch._C._functorch.is_functorch_wrapped_tensor(t):
            return True
        if torch._C._is_fwd_grad_enabled() and _fwad.unpack_dual(t).tangent is not None:
            return True
    return False


def uses_kernel(x: torch.Tensor, weight: Optional[torch.Tensor] = None) -> bool:
    """Whether :func:`norm_act_pool` runs the compiled kernel for these inputs (module docstring)."""
    if x.dtype not in FLOAT_DTYPES or not _extension.use_kernel(x, weight):
        return False
    return torch.compiler.is_compiling() or not _transformed(x, weight)


def norm_act_pool(x: torch.Tensor, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None, *,
                  act: str = "relu", softplus_beta: float = 60.0, pool: bool = True, eps: float = 1e-5) -> torch.Tensor:
    r"""Instance norm with affine parameters, then ReLU or softplus, then 2x2 average pooling, in one op
    (module docstring for the maths and its derivatives).

    Equal, to float rounding, to ``F.avg_pool2d(act(F.group_norm(x, C, weight, bias, eps)), 2)`` -- what
    ``GroupNorm(C, C) -> ReLU -> AvgPool2d(2, 2)`` computes -- and differentiable twice (``create_graph=True``).

    Args:
        x: ``Tensor[N, C, H, W]`` (the convolution's output), any layout; float32 or float64 for the compiled
            kernel (float16 / bfloat16 take the reference).
        weight, bias: ``Tensor[C]`` -- the norm's affine parameters :math:`\gamma, \beta`; both None: no
            normalisation (RCIG's ConvNet).
        act: ``"relu"`` or ``"softplus"`` (:math:`\log(1 + e^{\beta y}) / \beta`, linear above
            :math:`\beta y > 20` as ``F.softplus``).
        softplus_beta: :math:`\beta` of the softplus (RCIG distils with 60).
        pool: 2x2 average pooling with stride 2 (floor: an odd last row / column is dropped); False: none.
        eps: added to the variance (GroupNorm's 1e-5).

    Returns:
        ``Tensor[N, C, H // 2, W // 2]`` (``[N, C, H, W]`` without pooling) in ``x``'s dtype, contiguous.

    Raises:
        TypeError: a non-tensor or unsupported dtype; mismatched dtypes.
        ValueError: wrong ranks or shapes, only one of weight / bias, a bad ``act`` / ``softplus_beta`` / ``eps``,
            images smaller than 2x2 with pooling.

    Example::

        >>> y = norm_act_pool(conv(x), gn.weight, gn.bias)               # GroupNorm(C, C) -> ReLU -> AvgPool2d(2)
        >>> g, = torch.autograd.grad(y.square().sum(), x, create_graph=True)  # differentiable again
    """
    _check(x, weight, bias, act, softplus_beta, pool, eps)
    if uses_kernel(x, weight):
        return torch.ops.ddfast.norm_act_pool_forward(x, weight, bias, _ACT_CODE[act], float(softplus_beta), pool,
                                                      float(eps))[0]
    return _reference.norm_act_pool(x, weight, bias, act, softplus_beta, pool, eps)


# ---------------------------------------------------------------------------------------------------------------
# Registration: fake kernels and autograd for the compiled ops (only when ddfast._C is loaded).
# ---------------------------------------------------------------------------------------------------------------
def _grad_or_none(g: Optional[torch.Tensor], like: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """An upstream gradient for the double backward: None when absent or for an output that was masked off."""
    if g is None or like is None or g.shape != like.shape:
        return None
    return g


def _register() -> None:
    lib = "ddfast::"

    @torch.library.register_fake(lib + "norm_act_pool_forward")
    def _fwd_fake(x, weight, bias, act, beta, pool, eps):
        torch._check(x.dim() == 4, lambda: "x must be [N, C, H, W]")
        n, c, h, w = x.shape
        out = x.new_empty((n, c, h // 2, w // 2) if pool else (n, c, h, w))
        stats = (n, c) if weight is not None else (0, 0)
        return out, x.new_empty(stats), x.new_empty(stats)

    @torch.library.register_fake(lib + "norm_act_pool_backward")
    def _bwd_fake(grad_out, x, weight, bias, mean, rstd, act, beta, pool, output_mask):
        empty = x.new_empty((0,))
        return (x.new_empty(x.shape) if output_mask[0] else empty,
                x.new_empty((x.shape[1],)) if (output_mask[1] and weight is not None) else empty,
                x.new_empty((x.shape[1],)) if (output_mask[2] and weight is not None) else empty)

    @torch.library.register_fake(lib + "norm_act_pool_double_backward")
    def _dbl_fake(ggx, ggw, ggb, grad_out, x, weight, bias, mean, rstd, act, beta, pool, output_mask):
        empty = x.new_empty((0,))
        has_norm = weight is not None
        return (grad_out.new_empty(grad_out.shape) if output_mask[0] else empty,
                x.new_empty(x.shape) if output_mask[1] else empty,
                x.new_empty((x.shape[1],)) if (output_mask[2] and has_norm) else empty,
                x.new_empty((x.shape[1],)) if (output_mask[3] and has_norm) else empty)

    # forward -> backward op (differentiable) -> double backward op
    def _fwd_setup(ctx, inputs, output):
        x, weight, bias, act, beta, pool, _eps = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.act, ctx.beta, ctx.pool = act, beta, pool
        ctx.mark_non_differentiable(mean, rstd)

    def _fwd_backward(ctx, grad_out, _g_mean, _g_rstd):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [bool(need[0]), weight is not None and bool(need[1]), bias is not None and bool(need[2])]
        if not any(mask):
            return None, None, None, None, None, None, None
        dx, dw, db = torch.ops.ddfast.norm_act_pool_backward(grad_out.contiguous(), x, weight, bias, mean, rstd,
                                                             ctx.act, ctx.beta, ctx.pool, mask)
        return (dx if mask[0] else None, dw if mask[1] else None, db if mask[2] else None, None, None, None, None)

    torch.library.register_autograd(lib + "norm_act_pool_forward", _fwd_backward, setup_context=_fwd_setup)

    def _bwd_setup(ctx, inputs, output):
        grad_out, x, weight, bias, mean, rstd, act, beta, pool, _mask = inputs
        ctx.save_for_backward(grad_out, x, weight, bias, mean, rstd)
        ctx.act, ctx.beta, ctx.pool = act, beta, pool

    def _bwd_backward(ctx, g_dx, g_dw, g_db):
        grad_out, x, weight, bias, mean, rstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        has_norm = weight is not None
        mask = [bool(need[0]), bool(need[1]), has_norm and bool(need[2]), has_norm and bool(need[3])]
        if not any(mask):
            return (None,) * 10
        ggx = _grad_or_none(g_dx, x)
        ggw = _grad_or_none(g_dw, weight) if has_norm else None
        ggb = _grad_or_none(g_db, bias) if has_norm else None
        ggp, gx, gw, gb = torch.ops.ddfast.norm_act_pool_double_backward(
            ggx, ggw, ggb, grad_out, x, weight, bias, mean, rstd, ctx.act, ctx.beta, ctx.pool, mask)
        return (ggp if mask[0] else None, gx if mask[1] else None, gw if mask[2] else None,
                gb if mask[3] else None, None, None, None, None, None, None)

    torch.library.register_autograd(lib + "norm_act_pool_backward", _bwd_backward, setup_context=_bwd_setup)

    def _dbl_setup(ctx, inputs, output):
        pass

    def _dbl_backward(ctx, *grads):
        raise RuntimeError("norm_act_pool: third derivatives are not supported by the compiled op; build the model "
                           "with fused=False (plain modules) for them")

    torch.library.register_autograd(lib + "norm_act_pool_double_backward", _dbl_backward, setup_context=_dbl_setup)


if _extension.has_extension():
    _register()
