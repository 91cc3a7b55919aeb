"""First-order (NTK) linearisation of a network around fixed base parameters, for RCIG.

RCIG (Loo, Hasani, Lechner, Rus; ICML 2023, §3 "convexification") evaluates a pool
model with frozen base parameters ``theta0`` and a tangent ``psi`` by one forward-mode pass:

    f_lin(x; psi) = u(x; psi) + phi(x; theta0)^T W,     u(x; psi) = J_theta f(x; theta0) . psi

``phi`` are the penultimate features at ``theta0`` (the *primal* of the jvp), ``u`` is the *dual* of the
logits (the primal logits are dropped: the model is centred), and the last-layer weights ``W`` are solved in
closed form by kernel ridge regression on ``phi``. ``psi`` is masked: every parameter of the network body
(all conv weights and biases, and normalisation parameters if any) plus the final *bias*; the final kernel is
not a tangent direction (RCIG's ``get_tree_mask``).

:class:`LinearizedNet` gives three operations over a cached primal pass:

- ``forward(x) -> LinCache``: the primal pass (features ``phi [n, p]``), differentiable w.r.t. ``x``;
- ``jvp(cache, psi) -> u [n, C]``: the dual ``J psi`` (linear in ``psi``; differentiable w.r.t. ``psi`` and,
  through the cache, w.r.t. ``x`` -- RCIG's direct and implicit gradients need that);
- ``vjp(cache, g) -> J^T g [P_psi]``: the transpose, without an autograd graph.

Two implementations, selected by ``method``:

- ``"convnet"``: a hand-written tangent propagation for :class:`ddfast.models.ConvNet` without normalisation
  (``Conv2d -> ReLU|Softplus -> AvgPool2d`` blocks, RCIG's ``Conv``). The primal activations ``h_l`` and the
  activation derivatives ``sigma'(z_l)`` are computed once per cache and reused by every ``jvp``/``vjp``:
  a ``jvp`` costs ``conv(h_l, dW_l) + conv(t_l, W_l)`` per layer and a ``vjp`` one weight-gradient and one
  input-gradient convolution per layer (``torch.nn.grad``) -- about half of what re-running
  ``torch.func.jvp`` (primal + tangent) and differentiating it costs.
- ``"functorch"``: ``torch.func.jvp`` of ``torch.func.functional_call`` of any ddfast model along ``psi``
  (the reference's ``jax.jvp``); ``vjp`` differentiates that jvp w.r.t. ``psi`` by autograd. Generic, slower;
  used for models the ``"convnet"`` path does not cover, and as a cross-check in the tests.
- ``"auto"``: ``"convnet"`` when the model qualifies, else ``"functorch"``.

Tangent vectors are flat ``[P_psi]`` tensors in the order of :attr:`LinearizedNet.tangent_names` (a subset
of ``model.named_parameters()`` order), each parameter flattened row-major.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.convnet import _ACT_CODE, avg_pool_2x2, avg_pool_2x2_adjoint, norm_act_pool, uses_kernel

__all__ = ["LinearizedNet", "LinCache", "rcig_tangent_names", "METHODS"]

METHODS = ("auto", "convnet", "functorch")


def rcig_tangent_names(model: nn.Module) -> List[str]:
    """RCIG's tangent mask: every parameter except the classifier's weight (``get_tree_mask``: all conv
    (and normalisation) parameters plus the final bias). Raises ``ValueError`` if the model has no
    ``.classifier`` ``nn.Linear``."""
    clf = getattr(model, "classifier", None)
    if not isinstance(clf, nn.Linear):
        raise ValueError("model must expose a final nn.Linear as .classifier (ddfast models do)")
    skip = {id(clf.weight)}
    return [n for n, p in model.named_parameters() if id(p) not in skip]


@dataclass
class LinCache:
    """A primal pass of :class:`LinearizedNet` over a batch ``x [n, C, H, W]``.

    Attributes:
        features: ``phi(x; theta0)`` ``[n, p]`` (carries autograd history to ``x`` when ``x`` required grad).
        x: the input ``[n, C, H, W]`` (``"functorch"`` recomputes the primal from it in every jvp).
        layer: ``"convnet"`` only, one entry per op of the body: the input ``h_l`` of a conv, the activation
            derivative ``sigma'(z_l)`` (same shape as ``z_l``; ``1[z > 0]`` for ReLU, ``sigmoid(beta z)`` for
            softplus) of an activation, the pre-activation ``z_l`` of a fused activation + pooling block
            (:class:`ddfast.models.ActPool`; its jvp / vjp evaluate ``sigma'`` inside the kernels), ``None`` for a
            pooling op.
        shapes: ``"convnet"`` only: the input shape of every conv / pooling op (for the vjp).
    """

    features: torch.Tensor
    x: torch.Tensor
    layer: List[Optional[torch.Tensor]] = field(default_factory=list)
    shapes: List[Optional[torch.Size]] = field(default_factory=list)

    def detach(self) -> "LinCache":
        """A copy whose tensors carry no autograd history (for the no-grad inner / Hessian loops)."""
        return LinCache(self.features.detach(), self.x.detach(),
                        [t.detach() if t is not None else None for t in self.layer], list(self.shapes))

    @property
    def n(self) -> int:
        return self.features.shape[0]


class LinearizedNet:
    """The linearisation of ``model`` at ``params`` along the masked tangent (see the module docstring).

    Args:
        model: a ddfast model with ``.classifier`` (its own parameters are not used; its structure is).
        params: ``{name: Tensor}`` base parameters ``theta0`` for *every* parameter of ``model`` (detached
            views of a flat vector are fine; they are treated as constants).
        tangent_names: the names of the tangent directions (default :func:`rcig_tangent_names`).
        method: ``"auto"``, ``"convnet"`` or ``"functorch"``.

    Raises:
        ValueError: unknown ``method``; ``"convnet"`` for a model it does not support; missing parameters;
            a tangent name that is not a parameter.
    """

    def __init__(self, model: nn.Module, params: Dict[str, torch.Tensor],
                 tangent_names: Optional[Sequence[str]] = None, method: str = "auto"):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        names = [n for n, _ in model.named_parameters()]
        missing = [n for n in names if n not in params]
        if missing:
            raise ValueError(f"params lacks {missing}")
        self.model = model
        self.params = {n: params[n].detach() for n in names}
        self.tangent_names = list(rcig_tangent_names(model) if tangent_names is None else tangent_names)
        bad = [n for n in self.tangent_names if n not in self.params]
        if bad:
            raise ValueError(f"tangent_names {bad} are not parameters of the model")
        self.tangent_shapes = [self.params[n].shape for n in self.tangent_names]
        self.tangent_sizes = [int(math.prod(s)) for s in self.tangent_shapes]
        self.numel = int(sum(self.tangent_sizes))
        ops = _parse_convnet(model)
        if method == "convnet" and ops is None:
            raise ValueError("method='convnet' needs a ddfast ConvNet without normalisation whose body is "
                             "Conv2d -> ReLU|Softplus -> AvgPool2d blocks; use 'functorch'")
        if method == "convnet" or (method == "auto" and ops is not None):
            if set(self.tangent_names) - set(_convnet_tangent_ok(model)):
                raise ValueError("method='convnet' supports tangents on conv weights/biases and the final bias only")
            self.method = "convnet"
            self._ops = ops
        else:
            self.method = "functorch"
            self._ops = None
        clf = model.classifier
        self._clf_w = self.params[_param_name(model, clf.weight)]
        self._clf_b_name = _param_name(model, clf.bias) if clf.bias is not None else None

    # ---- tangent vectors -------------------------------------------------------------------------------
    def zeros(self, dtype=None, device=None) -> torch.Tensor:
        """``[P_psi]`` zeros (the inner problem's starting point)."""
        ref = self._clf_w
        return torch.zeros(self.numel, dtype=dtype or ref.dtype, device=device or ref.device)

    def split(self, psi: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``{name: view}`` of a flat tangent ``[P_psi]``."""
        if psi.dim() != 1 or psi.numel() != self.numel:
            raise ValueError(f"psi must have shape [{self.numel}], got {tuple(psi.shape)}")
        return {n: t.view(s) for n, t, s in zip(self.tangent_names, torch.split(psi, self.tangent_sizes),
                                                 self.tangent_shapes)}

    # ---- primal -------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> LinCache:
        """The primal pass over ``x float [n, C, H, W]``: features ``phi(x; theta0) [n, p]`` and what the
        jvp/vjp reuse. Differentiable w.r.t. ``x`` (autograd history kept when ``x`` requires grad)."""
        with torch.profiler.record_function("rcig/net_forward"):
            return self._forward(x)

    def _forward(self, x: torch.Tensor) -> LinCache:
        if self.method == "functorch":
            from torch.func import functional_call

            feats = functional_call(self.model, self.params, (x,), {"output": "embed"}, strict=False)
            return LinCache(feats, x)
        layer: List[Optional[torch.Tensor]] = []
        shapes: List[Optional[torch.Size]] = []
        h = x
        for op in self._ops:
            kind = op[0]
            if kind == "conv":
                mod = op[2]
                layer.append(h)
                shapes.append(h.shape)
                h = F.conv2d(h, self.params[op[1] + ".weight"], self.params.get(op[1] + ".bias"), mod.stride,
                             mod.padding, mod.dilation, mod.groups)
            elif kind == "relu":
                layer.append((h > 0).to(h.dtype))
                shapes.append(None)
                h = F.relu(h)
            elif kind == "softplus":
                beta, thr = op[1], op[2]
                bz = h * beta
                layer.append(torch.where(bz > thr, torch.ones_like(h), torch.sigmoid(bz)))
                shapes.append(None)
                h = F.softplus(h, beta=beta, threshold=thr)
            elif kind == "actpool":
                layer.append(h)
                shapes.append(h.shape)
                h = norm_act_pool(h, None, None, act=op[1], softplus_beta=op[2], pool=True)
            else:  # avgpool
                mod = op[1]
                layer.append(None)
                shapes.append(h.shape)
                h = _pool(h, mod)
        return LinCache(h.flatten(1), x, layer, shapes)

    # ---- jvp ------------------------------------------------------------------------------------------
    def jvp(self, cache: LinCache, psi: torch.Tensor) -> torch.Tensor:
        """``u = J_theta f(x; theta0) psi`` ``[n, C]`` (the centred dual of the logits; RCIG's
        ``get_linear_forward``). Linear in ``psi``; differentiable w.r.t. ``psi`` and the cache's ``x``."""
        with torch.profiler.record_function("rcig/net_jvp"):
            return self._jvp(cache, psi)

    def _jvp(self, cache: LinCache, psi: torch.Tensor) -> torch.Tensor:
        q = self.split(psi)
        if self.method == "functorch":
            return self._jvp_functorch(cache.x, q)
        t = None
        for op, saved in zip(self._ops, cache.layer):
            kind = op[0]
            if kind == "conv":
                mod = op[2]
                name = op[1]
                dz = F.conv2d(saved, q[name + ".weight"], q.get(name + ".bias"), mod.stride, mod.padding,
                              mod.dilation, mod.groups)
                if t is not None:
                    dz = dz + F.conv2d(t, self.params[name + ".weight"], None, mod.stride, mod.padding,
                                       mod.dilation, mod.groups)
                t = dz
            elif kind in ("relu", "softplus"):
                t = saved * t
            elif kind == "actpool":
                t = _act_pool_jvp(saved, t, op[1], op[2])
            else:
                mod = op[1]
                t = _pool(t, mod)
        u = t.flatten(1) @ self._clf_w.T
        if self._clf_b_name is not None and self._clf_b_name in q:
            u = u + q[self._clf_b_name]
        return u

    def _jvp_functorch(self, x: torch.Tensor, q: Dict[str, torch.Tensor]) -> torch.Tensor:
        from torch.func import functional_call, jvp

        frozen = {n: p for n, p in self.params.items() if n not in q}
        primals = {n: self.params[n] for n in q}

        def f(p):
            return functional_call(self.model, {**frozen, **p}, (x,), strict=False)

        _, dual = jvp(f, (primals,), (q,))
        return dual

    # ---- vjp ------------------------------------------------------------------------------------------
    def vjp(self, cache: LinCache, g: torch.Tensor) -> torch.Tensor:
        """``J^T g`` ``[P_psi]`` for ``g [n, C]`` (no autograd graph is built or kept)."""
        if g.shape != (cache.n, self._clf_w.shape[0]):
            raise ValueError(f"g must be [{cache.n}, {self._clf_w.shape[0]}], got {tuple(g.shape)}")
        with torch.profiler.record_function("rcig/net_vjp"):
            return self._vjp(cache, g)

    def _vjp(self, cache: LinCache, g: torch.Tensor) -> torch.Tensor:
        if self.method == "functorch":
            with torch.enable_grad():
                psi = self.zeros(dtype=g.dtype, device=g.device).requires_grad_(True)
                u = self._jvp_functorch(cache.x.detach(), self.split(psi))
                (out,) = torch.autograd.grad(u, psi, grad_outputs=g)
            return out
        with torch.no_grad():
            grads: Dict[str, torch.Tensor] = {}
            if self._clf_b_name is not None and self._clf_b_name in self.tangent_names:
                grads[self._clf_b_name] = g.sum(0)
            gt = (g @ self._clf_w).view(self._feature_map_shape(cache))
            first_conv = next(i for i, op in enumerate(self._ops) if op[0] == "conv")
            for i in range(len(self._ops) - 1, -1, -1):
                op, saved, shp = self._ops[i], cache.layer[i], cache.shapes[i]
                kind = op[0]
                if kind == "avgpool":
                    mod = op[1]
                    if _is_2x2(mod):
                        gt = avg_pool_2x2_adjoint(gt, shp)
                    else:
                        gt = torch.ops.aten.avg_pool2d_backward(
                            gt, gt.new_zeros(()).expand(shp), _pair(mod.kernel_size),
                            _pair(mod.stride if mod.stride is not None else mod.kernel_size), _pair(mod.padding),
                            mod.ceil_mode, mod.count_include_pad, mod.divisor_override)
                elif kind in ("relu", "softplus"):
                    gt = saved * gt
                elif kind == "actpool":
                    gt = _act_pool_vjp(saved, gt, op[1], op[2])
                else:
                    mod, name = op[2], op[1]
                    w = self.params[name + ".weight"]
                    if name + ".weight" in self.tangent_names:
                        grads[name + ".weight"] = torch.nn.grad.conv2d_weight(
                            saved, w.shape, gt, mod.stride, mod.padding, mod.dilation, mod.groups)
                    if name + ".bias" in self.tangent_names:
                        grads[name + ".bias"] = gt.sum((0, 2, 3))
                    if i != first_conv:
                        gt = torch.nn.grad.conv2d_input(shp, w, gt, mod.stride, mod.padding, mod.dilation,
                                                        mod.groups)
            return torch.cat([grads[n].reshape(-1) if n in grads else
                              torch.zeros(s, dtype=g.dtype, device=g.device)
                              for n, s in zip(self.tangent_names, self.tangent_sizes)])

    def _feature_map_shape(self, cache: LinCache) -> Tuple[int, ...]:
        shape = getattr(self.model, "feature_shape", None)
        if shape is None:
            raise ValueError("the model has no feature_shape")
        return (cache.n,) + tuple(shape)

    # ---- explicit Jacobian (tests, tiny nets only) -------------------------------------------------------
    def jacobian(self, cache: LinCache) -> torch.Tensor:
        """The dense ``J [n * C, P_psi]`` by ``P_psi`` jvps (row-major over ``[n, C]``). Tiny nets only."""
        cols = []
        with torch.no_grad():
            for k in range(self.numel):
                e = self.zeros(dtype=cache.features.dtype, device=cache.features.device)
                e[k] = 1.0
                cols.append(self.jvp(cache, e).reshape(-1))
        return torch.stack(cols, 1)


def _is_2x2(mod: nn.AvgPool2d) -> bool:
    """A plain 2x2, stride-2, unpadded average pooling (the ConvNet's), which :func:`avg_pool_2x2` computes."""
    return (_pair(mod.kernel_size) == [2, 2] and _pair(mod.stride if mod.stride is not None else 2) == [2, 2]
            and _pair(mod.padding) == [0, 0] and not mod.ceil_mode and mod.divisor_override is None)


# ---- the fused activation + 2x2 average pooling block, linearised -------------------------------------------
# With z the block's input (pre-activation) and P the 2x2 mean: the block is P(sigma(z)), its tangent map
# t -> P(sigma'(z) t) and the transpose g -> sigma'(z) P^T g. These are exactly the pieces of the fused op's
# derivatives (ddfast.ops.norm_act_pool without normalisation): the transpose is its backward at grad_out = g,
# the tangent map is its double backward's d/d(grad_out) at grad_grad_x = t, and the tangent map's derivative in
# z is the double backward's d/dx (sigma''(z) t P^T g). Without the compiled kernel: the same maths in ATen ops.

def _act_d1(z: torch.Tensor, act: str, beta: float) -> torch.Tensor:
    if act == "relu":
        return (z > 0).to(z.dtype)
    bz = z * beta
    return torch.where(bz > 20.0, torch.ones_like(z), torch.sigmoid(bz))


def _nap_none(z: torch.Tensor):
    return z.new_empty((0, 0))


class _ActPoolTangent(torch.autograd.Function):
    """``P(sigma'(z) t)`` with first derivatives in ``z`` and ``t`` (compiled kernel)."""

    @staticmethod
    def forward(ctx, z, t, act, beta):
        ctx.save_for_backward(z, t)
        ctx.act, ctx.beta = act, beta
        e = _nap_none(z)
        n, c, h, w = z.shape
        dummy = z.new_empty((n, c, h // 2, w // 2))  # grad_out: not read for d/d(grad_out) without normalisation
        out = torch.ops.ddfast.norm_act_pool_double_backward(t.contiguous(), None, None, dummy, z, None, None, e, e,
                                                             _ACT_CODE[act], beta, True, [True, False, False, False])
        return out[0]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        z, t = ctx.saved_tensors
        e = _nap_none(z)
        g = g.contiguous()
        gt = gz = None
        if ctx.needs_input_grad[1]:
            gt = torch.ops.ddfast.norm_act_pool_backward(g, z, None, None, e, e, _ACT_CODE[ctx.act], ctx.beta, True,
                                                         [True, False, False])[0]
        if ctx.needs_input_grad[0]:
            gz = torch.ops.ddfast.norm_act_pool_double_backward(
                t.contiguous(), None, None, g, z, None, None, e, e, _ACT_CODE[ctx.act], ctx.beta, True,
                [False, True, False, False])[1]
        return gz, gt, None, None


def _act_pool_jvp(z: torch.Tensor, t: torch.Tensor, act: str, beta: float) -> torch.Tensor:
    if uses_kernel(z) and uses_kernel(t):
        return _ActPoolTangent.apply(z, t, act, beta)
    return avg_pool_2x2(_act_d1(z, act, beta) * t)


def _act_pool_vjp(z: torch.Tensor, g: torch.Tensor, act: str, beta: float) -> torch.Tensor:
    if uses_kernel(z) and uses_kernel(g):
        e = _nap_none(z)
        return torch.ops.ddfast.norm_act_pool_backward(g.contiguous(), z, None, None, e, e, _ACT_CODE[act], beta,
                                                       True, [True, False, False])[0]
    return _act_d1(z, act, beta) * avg_pool_2x2_adjoint(g, z.shape)


def _pool(x: torch.Tensor, mod: nn.AvgPool2d) -> torch.Tensor:
    if _is_2x2(mod):
        return avg_pool_2x2(x)
    return F.avg_pool2d(x, mod.kernel_size, mod.stride, mod.padding, mod.ceil_mode, mod.count_include_pad,
                        mod.divisor_override)


def _pair(v) -> List[int]:
    if isinstance(v, int):
        return [v, v]
    return [int(a) for a in v]


def _param_name(model: nn.Module, p: torch.Tensor) -> str:
    for n, q in model.named_parameters():
        if q is p:
            return n
    raise ValueError("parameter not found in model")


def _convnet_tangent_ok(model: nn.Module) -> List[str]:
    return rcig_tangent_names(model)


def _parse_convnet(model: nn.Module):
    """The body of a :class:`ddfast.models.ConvNet` as ``[("conv", prefix, module) | ("relu",) |
    ("softplus", beta, threshold) | ("avgpool", module)]``, or ``None`` when unsupported."""
    from ..models import ActPool, ConvNet

    if not isinstance(model, ConvNet) or not isinstance(getattr(model, "features", None), nn.Sequential):
        return None
    ops = []
    for name, mod in model.features.named_children():
        if isinstance(mod, nn.Identity):  # a slot a fused module before it already computed
            continue
        if isinstance(mod, ActPool):  # fused activation + 2x2 average pooling (its jvp / vjp are fused too)
            ops.append(("actpool", mod.act, float(mod.softplus_beta)))
        elif isinstance(mod, nn.Conv2d):
            if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
                return None
            ops.append(("conv", f"features.{name}", mod))
        elif isinstance(mod, nn.ReLU):
            ops.append(("relu",))
        elif isinstance(mod, nn.Softplus):
            ops.append(("softplus", float(mod.beta), float(mod.threshold)))
        elif isinstance(mod, nn.AvgPool2d):
            ops.append(("avgpool", mod))
        else:
            return None
    if not ops or ops[0][0] != "conv":
        return None
    return ops
