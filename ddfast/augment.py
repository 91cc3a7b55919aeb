"""Differentiable augmentation and input transforms.

- :class:`DSA` -- Differentiable Siamese Augmentation (Zhao & Bilen, ICML 2021, "Dataset Condensation with
  Differentiable Siamese Augmentation", §3.2-3.3; MTT/DATM's ``utils.DiffAugment``): colour (brightness, saturation,
  contrast), crop (translation with zero fill), cutout, flip, scale and rotate, every one differentiable
  w.r.t. the pixels, with per-sample random parameters drawn from an explicit seed so that a real and a
  synthetic batch given the same seed get identical transformations ("siamese").
- :func:`diffaug` -- the batch-shared DiffAugment variant (Zhao et al., NeurIPS 2020; as used by IDC/DANCE
  for matching, default ``color_crop_cutout``): all groups applied, one set of
  parameters for the whole batch.
- :class:`ZCA` -- ZCA whitening fitted on the training set (Kessy et al. 2018; kornia's ``ZCAWhitening``
  recipe with ``eps=0.1`` as used by MTT/DATM/FRePo/RCIG), with its inverse for showing images.
- :func:`cutmix` -- CutMix (Yun et al., ICCV 2019) as IDC/DANCE use it when training networks on real or
  distilled data (one box and one partner permutation per batch).
- :class:`Normalize` -- per-channel ``(x - mean) / std`` with inverse; :class:`Compose` chains transforms;
  :func:`build_input_transform` builds the usual network-input transforms from a training set.

Images are ``float [N, C, H, W]``. Transforms are plain objects holding tensors (``state_dict()`` returns
plain tensors, loadable with ``from_state_dict``/``load_state_dict``), movable with ``.to(device)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = [
    "DSA",
    "DSAParams",
    "diffaug",
    "DSA_GROUPS",
    "ZCA",
    "Normalize",
    "Compose",
    "Identity",
    "build_input_transform",
    "transform_from_state_dict",
    "cutmix",
]

# group name -> the ops it applies, in order
DSA_GROUPS: Dict[str, Tuple[str, ...]] = {
    "color": ("brightness", "saturation", "contrast"),
    "brightness": ("brightness",),
    "saturation": ("saturation",),
    "contrast": ("contrast",),
    "crop": ("translate",),
    "translate": ("translate",),
    "cutout": ("cutout",),
    "flip": ("flip",),
    "scale": ("scale",),
    "rotate": ("rotate",),
}

# columns of the per-sample uniform table (fixed layout, independent of strategy and mode)
_COLS = {"brightness": 0, "saturation": 1, "contrast": 2, "tx": 3, "ty": 4, "cut_x": 5, "cut_y": 6,
         "flip": 7, "sx": 8, "sy": 9, "rot": 10}
_NCOLS = len(_COLS)

SeedLike = Union[int, torch.Generator, None]


@dataclass
class DSAParams:
    """The random draw of one :class:`DSA` call.

    Attributes:
        groups: the groups applied, in order (one group in mode ``'S'``, all in mode ``'M'``).
        uniforms: ``float64 [N, 11]`` uniforms in [0, 1) on the CPU (columns: brightness, saturation,
            contrast, tx, ty, cut_x, cut_y, flip, sx, sy, rot); row i parameterises sample i. With the same
            seed, the first ``n`` rows are identical whatever the batch size (rows are drawn sample by
            sample from one CPU generator).
    """

    groups: Tuple[str, ...]
    uniforms: torch.Tensor

    def __len__(self) -> int:
        return self.uniforms.shape[0]


def _generator(seed: SeedLike, fallback: torch.Generator) -> torch.Generator:
    if seed is None:
        return fallback
    if isinstance(seed, torch.Generator):
        if seed.device.type != "cpu":
            raise ValueError("seed generator must be a CPU torch.Generator")
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, a CPU torch.Generator or None, got {type(seed).__name__}")
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    return g


def _check_images(x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be [N, C, H, W], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got {x.dtype}")


class DSA:
    """Differentiable Siamese Augmentation (Zhao & Bilen 2021).

    Args:
        strategy: groups joined by ``_``, from ``color`` (= brightness + saturation + contrast),
            ``crop`` (alias ``translate``), ``cutout``, ``flip``, ``scale``, ``rotate`` and the single colour
            ops ``brightness``/``saturation``/``contrast``. Default ``"color_crop_cutout_flip_scale_rotate"``.
        mode: ``'S'`` -- one group picked at random per call (the same for the whole batch), with
            per-sample parameters (MTT/DATM default); ``'M'`` -- every group applied in order.
        batch_shared: one parameter set for the whole batch (DiffAug/IDC "batch" mode) instead of
            per-sample parameters.
        seed: seed of the object's own generator, used by calls that pass no seed.
        prob_flip: horizontal-flip probability (0.5).
        ratio_scale: scale factors uniform in ``[1/ratio_scale, ratio_scale]`` per axis (1.2).
        ratio_rotate: rotation uniform in ``[-ratio_rotate, ratio_rotate]`` degrees (15).
        ratio_crop_pad: translation up to ``round(ratio * size)`` pixels per axis, zero fill (0.125).
        ratio_cutout: side of the zeroed square, ``round(ratio * size)`` (0.5).
        brightness: additive shift uniform in ``[-brightness/2, brightness/2]`` (1.0 -> +-0.5).
        saturation: per-sample factor uniform in ``[0, saturation]`` on the deviation from the channel
            mean (2.0 -> x[0, 2]).
        contrast: factor uniform in ``[contrast, contrast + 1]`` on the deviation from the image mean
            (0.5 -> x[0.5, 1.5]).

    Call: ``dsa(x, seed=None) -> [N, C, H, W]``. ``seed`` (int or CPU ``torch.Generator``) fixes the draw;
    two calls with the same int seed on batches of sizes n <= m give sample i (i < n) the same
    transformation (siamese augmentation of a real and a synthetic batch). All ops are differentiable
    w.r.t. ``x`` (gather, masks, ``grid_sample``) to any order needed by trajectory matching.

    Raises:
        ValueError: unknown group in ``strategy``, bad ``mode``, out-of-range ratios, bad ``x``.
    """

    def __init__(self, strategy: str = "color_crop_cutout_flip_scale_rotate", mode: str = "S",
                 batch_shared: bool = False, seed: int = 0, prob_flip: float = 0.5, ratio_scale: float = 1.2,
                 ratio_rotate: float = 15.0, ratio_crop_pad: float = 0.125, ratio_cutout: float = 0.5,
                 brightness: float = 1.0, saturation: float = 2.0, contrast: float = 0.5):
        if not isinstance(strategy, str):
            raise TypeError(f"strategy must be a str, got {type(strategy).__name__}")
        groups = tuple(g for g in strategy.lower().split("_") if g)
        bad = [g for g in groups if g not in DSA_GROUPS]
        if bad or not groups:
            raise ValueError(f"strategy {strategy!r}: unknown group(s) {bad}; valid groups: {sorted(DSA_GROUPS)}")
        if mode not in ("S", "M"):
            raise ValueError(f"mode must be 'S' or 'M', got {mode!r}")
        if not 0.0 <= prob_flip <= 1.0:
            raise ValueError(f"prob_flip must be in [0, 1], got {prob_flip}")
        if not ratio_scale >= 1.0:
            raise ValueError(f"ratio_scale must be >= 1, got {ratio_scale}")
        for name, v in (("ratio_rotate", ratio_rotate), ("ratio_crop_pad", ratio_crop_pad),
                        ("ratio_cutout", ratio_cutout), ("brightness", brightness),
                        ("saturation", saturation), ("contrast", contrast)):
            if not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a finite number >= 0, got {v}")
        if ratio_crop_pad >= 1 or ratio_cutout > 1:
            raise ValueError("ratio_crop_pad must be < 1 and ratio_cutout <= 1")
        self.strategy = "_".join(groups)
        self.groups = groups
        self.mode = mode
        self.batch_shared = bool(batch_shared)
        self.prob_flip = float(prob_flip)
        self.ratio_scale = float(ratio_scale)
        self.ratio_rotate = float(ratio_rotate)
        self.ratio_crop_pad = float(ratio_crop_pad)
        self.ratio_cutout = float(ratio_cutout)
        self.brightness = float(brightness)
        self.saturation = float(saturation)
        self.contrast = float(contrast)
        self._gen = torch.Generator(device="cpu")
        self._gen.manual_seed(int(seed))

    def config(self) -> dict:
        """JSON-serialisable constructor arguments (without the seed)."""
        return {k: getattr(self, k) for k in ("strategy", "mode", "batch_shared", "prob_flip", "ratio_scale",
                                              "ratio_rotate", "ratio_crop_pad", "ratio_cutout", "brightness",
                                              "saturation", "contrast")}

    def __repr__(self) -> str:
        return f"DSA(strategy={self.strategy!r}, mode={self.mode!r}, batch_shared={self.batch_shared})"

    # -- parameters -----------------------------------------------------------------------------------------
    def sample(self, n: int, seed: SeedLike = None) -> DSAParams:
        """Draws the parameters for a batch of ``n`` images (see :class:`DSAParams`)."""
        if int(n) <= 0:
            raise ValueError(f"n must be positive, got {n}")
        g = _generator(seed, self._gen)
        if self.mode == "S":
            k = int(torch.randint(len(self.groups), (1,), generator=g).item())
            groups = (self.groups[k],)
        else:
            groups = self.groups
        u = torch.rand(int(n), _NCOLS, generator=g, dtype=torch.float64)
        if self.batch_shared:
            u = u[:1].expand(int(n), _NCOLS).clone()
        return DSAParams(groups=groups, uniforms=u)

    def __call__(self, x: torch.Tensor, seed: SeedLike = None) -> torch.Tensor:
        _check_images(x)
        return self.apply(x, self.sample(x.shape[0], seed))

    def apply(self, x: torch.Tensor, params: DSAParams) -> torch.Tensor:
        """Applies a drawn :class:`DSAParams` to ``x [N, C, H, W]`` (``len(params) >= N``; the first N rows
        are used)."""
        _check_images(x)
        n = x.shape[0]
        if len(params) < n:
            raise ValueError(f"params were drawn for {len(params)} samples, x has {n}")
        u = params.uniforms[:n].to(device=x.device, dtype=x.dtype)
        for group in params.groups:
            for op in DSA_GROUPS[group]:
                x = getattr(self, "_" + op)(x, u)
        return x

    def group_weights(self, params: DSAParams) -> torch.Tensor:
        """``float32 [len(self.groups)]`` on the CPU: 1 for each group of ``self.groups`` that ``params``
        applies, 0 elsewhere (one-hot in mode ``'S'``). With :meth:`apply_weighted` it moves mode ``'S'``'s group
        choice from the host into a tensor, so that the kernel sequence no longer depends on the draw (what a
        CUDA graph needs)."""
        chosen = set(params.groups)
        return torch.tensor([1.0 if g in chosen else 0.0 for g in self.groups])

    def apply_weighted(self, x: torch.Tensor, u: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``sum_g weights[g] * group_g(x)`` over the groups of ``self.groups`` (each group's ops applied to
        ``x`` alone, as mode ``'S'`` does), with ``u [N, 11]`` uniforms on ``x``'s device and dtype and
        ``weights [len(self.groups)]`` on ``x``'s device. For the one-hot weights of :meth:`group_weights` this
        is exactly :meth:`apply` of mode ``'S'`` (the other groups add ``0 * finite``; values and gradients are
        equal), at the cost of running every group. Raises ``ValueError`` on a wrong number of weights."""
        _check_images(x)
        if weights.shape != (len(self.groups),):
            raise ValueError(f"weights must have shape ({len(self.groups)},) (one per group of {self.strategy!r}), "
                             f"got {tuple(weights.shape)}")
        out = None
        for gi, group in enumerate(self.groups):
            y = x
            for op in DSA_GROUPS[group]:
                y = getattr(self, "_" + op)(y, u)
            term = y * weights[gi]
            out = term if out is None else out + term
        return out

    # -- ops (u: [N, 11] uniforms on x's device) ------------------------------------------------------------
    def _brightness(self, x, u):
        return x + ((u[:, _COLS["brightness"]] - 0.5) * self.brightness).view(-1, 1, 1, 1)

    def _saturation(self, x, u):
        m = x.mean(dim=1, keepdim=True)
        return (x - m) * (u[:, _COLS["saturation"]] * self.saturation).view(-1, 1, 1, 1) + m

    def _contrast(self, x, u):
        m = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - m) * (u[:, _COLS["contrast"]] + self.contrast).view(-1, 1, 1, 1) + m

    def _translate(self, x, u):
        n, c, h, w = x.shape
        sy, sx = int(h * self.ratio_crop_pad + 0.5), int(w * self.ratio_crop_pad + 0.5)
        if sx == 0 and sy == 0:
            return x
        ty = torch.floor(u[:, _COLS["ty"]] * (2 * sy + 1)).long().clamp_(max=2 * sy) - sy
        tx = torch.floor(u[:, _COLS["tx"]] * (2 * sx + 1)).long().clamp_(max=2 * sx) - sx
        rows = torch.arange(h, device=x.device).view(1, h) + ty.view(n, 1)  # [N, H]
        cols = torch.arange(w, device=x.device).view(1, w) + tx.view(n, 1)  # [N, W]
        valid = ((rows >= 0) & (rows < h)).view(n, 1, h, 1) & ((cols >= 0) & (cols < w)).view(n, 1, 1, w)
        rows, cols = rows.clamp(0, h - 1), cols.clamp(0, w - 1)
        idx = torch.arange(n, device=x.device).view(n, 1, 1)
        out = x.permute(0, 2, 3, 1)[idx, rows.view(n, h, 1), cols.view(n, 1, w)]  # [N, H, W, C]
        return out.permute(0, 3, 1, 2) * valid.to(x.dtype)

    def _cutout(self, x, u):
        n, c, h, w = x.shape
        ch, cw = int(h * self.ratio_cutout + 0.5), int(w * self.ratio_cutout + 0.5)
        if ch == 0 or cw == 0:
            return x
        cy = torch.floor(u[:, _COLS["cut_y"]] * h).long().clamp_(max=h - 1)
        cx = torch.floor(u[:, _COLS["cut_x"]] * w).long().clamp_(max=w - 1)
        y0, x0 = (cy - ch // 2).view(n, 1), (cx - cw // 2).view(n, 1)
        r = torch.arange(h, device=x.device).view(1, h)
        q = torch.arange(w, device=x.device).view(1, w)
        in_r = (r >= y0) & (r < y0 + ch)
        in_c = (q >= x0) & (q < x0 + cw)
        keep = ~(in_r.view(n, 1, h, 1) & in_c.view(n, 1, 1, w))
        return x * keep.to(x.dtype)

    def _flip(self, x, u):
        m = (u[:, _COLS["flip"]] < self.prob_flip).view(-1, 1, 1, 1)
        return torch.where(m, x.flip(3), x)

    def _affine(self, x, theta):
        grid = F.affine_grid(theta, list(x.shape), align_corners=True)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)

    def _scale(self, x, u):
        lo, hi = 1.0 / self.ratio_scale, self.ratio_scale
        sx = u[:, _COLS["sx"]] * (hi - lo) + lo
        sy = u[:, _COLS["sy"]] * (hi - lo) + lo
        z = torch.zeros_like(sx)
        theta = torch.stack([torch.stack([sx, z, z], 1), torch.stack([z, sy, z], 1)], 1)
        return self._affine(x, theta)

    def _rotate(self, x, u):
        ang = (u[:, _COLS["rot"]] - 0.5) * 2.0 * self.ratio_rotate * (math.pi / 180.0)
        cos, sin, z = torch.cos(ang), torch.sin(ang), torch.zeros_like(ang)
        theta = torch.stack([torch.stack([cos, sin, z], 1), torch.stack([-sin, cos, z], 1)], 1)
        return self._affine(x, theta)


def diffaug(strategy: str = "color_crop_cutout", seed: int = 0, **kw) -> DSA:
    """DiffAugment as DANCE/IDC use it for matching (Zhao et al. NeurIPS 2020): every
    group of ``strategy`` applied (mode ``'M'``) with one parameter set shared by the whole batch, so a
    concatenated real+synthetic batch is transformed identically. Keywords go to :class:`DSA`."""
    return DSA(strategy, mode="M", batch_shared=True, seed=seed, **kw)


# --------------------------------------------------------------------------------------------------------
# input transforms
# --------------------------------------------------------------------------------------------------------


class Identity:
    """The identity input transform (``transform``/``inverse`` return ``x``)."""

    kind = "identity"

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        return x

    __call__ = transform

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> "Identity":
        return self

    def to(self, device=None, dtype=None) -> "Identity":
        return self


class Normalize:
    """Per-channel normalisation ``(x - mean) / std`` and its inverse.

    Args:
        mean, std: sequences (or 1-D tensors) of length C; ``std > 0``.

    ``transform(x [N, C, H, W]) -> [N, C, H, W]``; ``inverse`` undoes it. Raises ``ValueError`` for a
    non-positive std, a length mismatch with ``x``'s channels, or non-finite values.
    """

    kind = "normalize"

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        mean_t = torch.as_tensor(mean, dtype=torch.float64).reshape(-1).clone()
        std_t = torch.as_tensor(std, dtype=torch.float64).reshape(-1).clone()
        if mean_t.numel() == 0 or mean_t.shape != std_t.shape:
            raise ValueError(f"mean and std must be non-empty and of equal length, got {mean_t.numel()} and "
                             f"{std_t.numel()}")
        if not torch.isfinite(mean_t).all() or not torch.isfinite(std_t).all():
            raise ValueError("mean and std must be finite")
        if (std_t <= 0).any():
            raise ValueError(f"std must be > 0, got {std_t.tolist()}")
        self.mean = mean_t
        self.std = std_t

    def _stats(self, x: torch.Tensor):
        _check_images(x)
        if x.shape[1] != self.mean.numel():
            raise ValueError(f"x has {x.shape[1]} channels, Normalize has {self.mean.numel()}")
        m = self.mean.to(device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        s = self.std.to(device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        return m, s

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        m, s = self._stats(x)
        return (x - m) / s

    __call__ = transform

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        m, s = self._stats(x)
        return x * s + m

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """``{"mean": float64 [C], "std": float64 [C]}``."""
        return {"mean": self.mean.clone(), "std": self.std.clone()}

    @classmethod
    def from_state_dict(cls, state: Dict[str, torch.Tensor]) -> "Normalize":
        return cls(state["mean"], state["std"])

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> "Normalize":
        other = Normalize.from_state_dict(state)
        self.mean, self.std = other.mean, other.std
        return self

    def to(self, device=None, dtype=None) -> "Normalize":
        return self  # statistics are moved per call

    def __repr__(self) -> str:
        return f"Normalize(mean={[round(v, 4) for v in self.mean.tolist()]}, std={[round(v, 4) for v in self.std.tolist()]})"


class ZCA:
    """ZCA whitening (Bell & Sejnowski 1997; Kessy, Lewin & Strimmer 2018, "Optimal whitening and
    decorrelation", ZCA = Mahalanobis whitening), fitted on a training set as kornia's
    ``ZCAWhitening(eps=0.1)`` does for MTT/DATM (their ``buffer.py``):

        mu = mean_i x_i,   S = X_c^T X_c / (N - 1)  (unbiased)  = U diag(lam) U^T
        W  = U diag((lam + eps)^-1/2) U^T,   transform(x) = (x - mu) W,   inverse(y) = y W^-1 + mu

    with ``W^-1 = U diag((lam + eps)^1/2) U^T``. On the fitted data the covariance of the output is
    ``U diag(lam / (lam + eps)) U^T`` (identity up to the ``eps`` regularisation).

    Use :meth:`fit` (classmethod) to build one. ``transform``/``inverse`` take ``float [N, C, H, W]`` with
    the fitted ``(C, H, W)`` and are differentiable (a matrix product). State: ``state_dict()`` ->
    ``{"mean": [D], "transform": [D, D], "inverse": [D, D], "eps": [], "shape": int64 [3]}`` (float32
    matrices; D = C*H*W).
    """

    kind = "zca"

    def __init__(self, mean: torch.Tensor, transform: torch.Tensor, inverse: torch.Tensor, eps: float,
                 shape: Sequence[int]):
        D = int(mean.numel())
        shape = tuple(int(v) for v in shape)
        if len(shape) != 3 or math.prod(shape) != D:
            raise ValueError(f"shape {shape} does not match the mean's {D} entries")
        if tuple(transform.shape) != (D, D) or tuple(inverse.shape) != (D, D):
            raise ValueError(f"transform/inverse must be [{D}, {D}]")
        self.mean = mean.reshape(D)
        self.matrix = transform
        self.inverse_matrix = inverse
        self.eps = float(eps)
        self.shape = shape

    @classmethod
    def fit(cls, images: torch.Tensor, eps: float = 0.1, unbiased: bool = True,
            chunk: int = 4096) -> "ZCA":
        """Fits on ``images float [N, C, H, W]`` (N >= 2). The covariance is accumulated in float64 from
        float32 chunks of ``chunk`` rows and eigendecomposed in float64 (``torch.linalg.eigh``).

        Raises:
            ValueError: bad ``images`` (shape, non-finite values, N < 2) or ``eps <= 0``.
        """
        _check_images(images, "images")
        if images.shape[0] < 2:
            raise ValueError("images: ZCA needs at least 2 images")
        if not (eps > 0 and math.isfinite(eps)):
            raise ValueError(f"eps must be a finite number > 0, got {eps}")
        x = images.detach().reshape(images.shape[0], -1)
        if not torch.isfinite(x).all():
            raise ValueError("images contain NaN or inf")
        n, d = x.shape
        mean = x.double().mean(0)
        cov = torch.zeros(d, d, dtype=torch.float64, device=x.device)
        m32 = mean.to(torch.float32)
        for i in range(0, n, int(chunk)):
            xc = x[i:i + int(chunk)].to(torch.float32) - m32
            cov += (xc.T @ xc).double()
        cov /= (n - 1) if unbiased else n
        lam, U = torch.linalg.eigh(cov)
        lam = lam.clamp_min(0.0)
        W = (U * (lam + eps).rsqrt()) @ U.T
        W_inv = (U * (lam + eps).sqrt()) @ U.T
        return cls(mean.float().cpu(), W.float().cpu(), W_inv.float().cpu(), eps, images.shape[1:])

    def _flat(self, x: torch.Tensor, name: str = "x") -> torch.Tensor:
        _check_images(x, name)
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"{name} has per-image shape {tuple(x.shape[1:])}, ZCA was fitted on {self.shape}")
        return x.reshape(x.shape[0], -1)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """Whitens ``x [N, C, H, W]`` -> same shape."""
        xf = self._flat(x)
        m = self.mean.to(device=x.device, dtype=x.dtype)
        return ((xf - m) @ self.matrix.to(device=x.device, dtype=x.dtype)).view_as(x)

    __call__ = transform

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Un-whitens ``y [N, C, H, W]`` (for showing images) -> same shape."""
        yf = self._flat(y, "y")
        m = self.mean.to(device=y.device, dtype=y.dtype)
        return (yf @ self.inverse_matrix.to(device=y.device, dtype=y.dtype) + m).view_as(y)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {"mean": self.mean.clone(), "transform": self.matrix.clone(), "inverse": self.inverse_matrix.clone(),
                "eps": torch.tensor(self.eps, dtype=torch.float64),
                "shape": torch.tensor(self.shape, dtype=torch.int64)}

    @classmethod
    def from_state_dict(cls, state: Dict[str, torch.Tensor]) -> "ZCA":
        missing = {"mean", "transform", "inverse", "eps", "shape"} - set(state)
        if missing:
            raise ValueError(f"ZCA state_dict lacks {sorted(missing)}")
        return cls(state["mean"], state["transform"], state["inverse"], float(state["eps"]),
                   [int(v) for v in state["shape"].tolist()])

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> "ZCA":
        other = ZCA.from_state_dict(state)
        self.__dict__.update(other.__dict__)
        return self

    def to(self, device=None, dtype=None) -> "ZCA":
        """Moves the matrices (in place) and returns ``self``."""
        self.mean = self.mean.to(device=device, dtype=dtype)
        self.matrix = self.matrix.to(device=device, dtype=dtype)
        self.inverse_matrix = self.inverse_matrix.to(device=device, dtype=dtype)
        return self

    def __repr__(self) -> str:
        return f"ZCA(shape={self.shape}, eps={self.eps})"


class Compose:
    """Chains input transforms: ``transform`` applies them in order, ``inverse`` in reverse order.
    ``state_dict`` prefixes each part's keys with ``"{i}.{kind}."``."""

    kind = "compose"

    def __init__(self, *transforms):
        if len(transforms) == 1 and isinstance(transforms[0], (list, tuple)):
            transforms = tuple(transforms[0])
        for t in transforms:
            if not (callable(getattr(t, "transform", None)) and callable(getattr(t, "inverse", None))):
                raise TypeError(f"every part needs transform() and inverse(), got {type(t).__name__}")
        self.transforms = list(transforms)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        for t in self.transforms:
            x = t.transform(x)
        return x

    __call__ = transform

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        for t in reversed(self.transforms):
            x = t.inverse(x)
        return x

    def state_dict(self) -> Dict[str, torch.Tensor]:
        out = {}
        for i, t in enumerate(self.transforms):
            for k, v in t.state_dict().items():
                out[f"{i}.{t.kind}.{k}"] = v
            if not t.state_dict():
                out[f"{i}.{t.kind}.__empty__"] = torch.zeros(0)
        return out

    @classmethod
    def from_state_dict(cls, state: Dict[str, torch.Tensor]) -> "Compose":
        parts: Dict[int, Tuple[str, Dict[str, torch.Tensor]]] = {}
        for key, v in state.items():
            i, kind, name = key.split(".", 2)
            parts.setdefault(int(i), (kind, {}))[1][name] = v
        out = []
        for i in sorted(parts):
            kind, sd = parts[i]
            sd.pop("__empty__", None)
            out.append(transform_from_state_dict(kind, sd))
        return cls(*out)

    def to(self, device=None, dtype=None) -> "Compose":
        for t in self.transforms:
            t.to(device=device, dtype=dtype)
        return self

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(repr(t) for t in self.transforms) + ")"


def transform_from_state_dict(kind: str, state: Dict[str, torch.Tensor]):
    """Rebuilds a transform from its ``kind`` attribute and ``state_dict()``."""
    if kind == "identity":
        return Identity()
    if kind == "normalize":
        return Normalize.from_state_dict(state)
    if kind == "zca":
        return ZCA.from_state_dict(state)
    if kind == "compose":
        return Compose.from_state_dict(state)
    raise ValueError(f"unknown transform kind {kind!r}")


def build_input_transform(kind: str, images: Optional[torch.Tensor] = None, mean=None, std=None,
                          eps: float = 0.1):
    """The network-input transform fitted on a training set.

    Args:
        kind: ``"none"`` (identity), ``"normalize"`` (per-channel mean/std), ``"zca"`` (ZCA fitted on the raw
            ``images``) or ``"normalize+zca"`` (normalise, then ZCA fitted on the normalised images: the
            MTT/DATM pipeline).
        images: the training images ``float [N, C, H, W]`` (needed for ``zca``; for ``normalize`` when
            ``mean``/``std`` are not given, the per-channel statistics are computed from them).
        mean, std: per-channel statistics (e.g. ``ImageDataset.mean``/``.std``).
        eps: ZCA regulariser (0.1).

    Raises:
        ValueError: unknown ``kind`` or missing ``images``/statistics.
    """
    kinds = ("none", "normalize", "zca", "normalize+zca")
    if kind not in kinds:
        raise ValueError(f"kind must be one of {kinds}, got {kind!r}")
    if kind == "none":
        return Identity()
    norm = None
    if "normalize" in kind:
        if mean is None or std is None:
            if images is None:
                raise ValueError("normalize needs mean/std or images")
            _check_images(images, "images")
            mean = images.double().mean(dim=(0, 2, 3)).tolist()
            std = images.double().std(dim=(0, 2, 3)).tolist()
        norm = Normalize(mean, std)
        if kind == "normalize":
            return norm
    if images is None:
        raise ValueError("zca needs the training images")
    if norm is None:
        return ZCA.fit(images, eps=eps)
    return Compose(norm, ZCA.fit(norm.transform(images), eps=eps))


# --------------------------------------------------------------------------------------------------------
# CutMix
# --------------------------------------------------------------------------------------------------------


def cutmix(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator, beta: float = 1.0, p: float = 1.0):
    """CutMix (Yun, Han, Oh, Chun, Choe, Yoo; ICCV 2019, eq. 1-2), batch-level as in IDC/DANCE's
    ``train_epoch`` (``mixup='cut'``).

    With probability ``p`` (one coin per batch): draw ``lam ~ Beta(beta, beta)``, a random partner
    permutation ``perm`` of the batch and one box of side ``int(H * sqrt(1 - lam))`` x ``int(W * sqrt(1 - lam))``
    centred at a uniform pixel (clipped to the image); paste ``x[perm]`` into the box of every image. The
    loss is then ``ratio * loss(out, y) + (1 - ratio) * loss(out, y[perm])`` with ``ratio`` = the kept
    fraction of pixels (after clipping).

    Args:
        x: ``float [N, C, H, W]`` (not modified; a mixed copy is returned).
        y: labels ``[N, ...]`` (hard or soft; only permuted).
        generator: CPU ``torch.Generator``; every draw comes from it (``lam`` via a NumPy generator seeded
            from it), so the same generator state gives the same mix.
        beta: Beta-distribution parameter (> 0; 1 = uniform ``lam``).
        p: probability of mixing this batch, in [0, 1].

    Returns:
        ``(x_mixed [N, C, H, W], y[perm], ratio float)``; when the coin says no: ``(x, y, 1.0)``.

    Raises:
        ValueError: bad ``x``, ``y`` of another length, ``beta <= 0`` or ``p`` outside [0, 1].
    """
    import numpy as np

    _check_images(x)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"y has {y.shape[0]} rows, x has {x.shape[0]}")
    if not (beta > 0 and math.isfinite(beta)):
        raise ValueError(f"beta must be a finite number > 0, got {beta}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise ValueError("generator must be a CPU torch.Generator")
    if p <= 0.0 or float(torch.rand(1, generator=generator, dtype=torch.float64)) >= p:
        return x, y, 1.0
    n, _, h, w = x.shape
    rng = np.random.default_rng(int(torch.randint(2 ** 62, (1,), generator=generator)))
    lam = float(rng.beta(beta, beta))
    perm = torch.randperm(n, generator=generator).to(x.device)
    cut = math.sqrt(max(0.0, 1.0 - lam))
    ch, cw = int(h * cut), int(w * cut)
    cy = int(torch.randint(h, (1,), generator=generator))
    cx = int(torch.randint(w, (1,), generator=generator))
    y0, y1 = min(max(cy - ch // 2, 0), h), min(max(cy + ch // 2, 0), h)
    x0, x1 = min(max(cx - cw // 2, 0), w), min(max(cx + cw // 2, 0), w)
    out = x.clone()
    out[:, :, y0:y1, x0:x1] = x[perm][:, :, y0:y1, x0:x1]
    ratio = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)
    return out, y[perm.to(y.device)], ratio
