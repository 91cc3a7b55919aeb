"""Networks used by the distillers and the evaluation harness, and functional (flat-parameter) helpers.

Models
------
- :class:`ConvNet` -- the ConvNet-D of the dataset-distillation literature (Gidaris & Komodakis 2018 as used
  by DC/DSA/DM, MTT, FTD, TESLA, DATM and DANCE): ``depth`` blocks of
  ``Conv3x3(pad 1) -> norm -> act -> pool 2x2``, then flatten and one ``Linear``.
- :func:`convnet_datm` -- the DATM/MTT/DANCE variant: width 128, instance norm realised as
  ``GroupNorm(C, C)`` with affine parameters, ReLU, average pooling. 320,010 parameters for CIFAR-10
  (MTT/DATM's ``networks.py``).
- :func:`convnet_rcig` -- RCIG's ``Conv`` (Loo et al., ICML 2023, §5; ``yolky/RCIG`` ``models.py``): widths 128, 256, 512
  (doubling per layer), no normalisation, softplus with beta 60 while distilling at depth 3 and ReLU for
  evaluation. The 32 px body has 1,478,912 parameters.
- :class:`ConvNetD4` -- ConvNet of depth 4 (64 px inputs, e.g. Tiny-ImageNet).
- :func:`resnet18` -- torchvision's ResNet-18 with the small-image stem (3x3 stride-1 first conv, no max
  pool), for cross-architecture checks.

MTT's handling of 28x28 one-channel images (MNIST, Fashion-MNIST): the first convolution uses padding 3, so
a 28x28 input becomes a 32x32 feature map and a depth-3 net ends on 4x4 (embedding ``width * 16``, 2048
for width 128). :class:`ConvNet` does this automatically for ``in_channels == 1`` and ``im_size == (28, 28)``
(``first_padding`` overrides it).

Every model exposes ``.embed(x) -> [N, D]`` (penultimate features), ``.classifier`` (the last
``nn.Linear``), ``.feature_dim`` (``D``) and ``forward(x, output="logits"|"embed"|"both")``.

Functional helpers (flat parameter vectors)
-------------------------------------------
The *flat order* is the order of ``model.named_parameters()`` (module registration order; for
:class:`ConvNet`: ``features.0.weight, features.0.bias, features.1.weight, ...,
classifier.weight, classifier.bias``), each tensor flattened in row-major (C) order. Buffers (batch-norm
running statistics) are not part of the flat vector. See :func:`flat_params`.

- :func:`flat_params`, :func:`param_shapes`, :func:`unflatten`, :func:`load_flat`
- :func:`functional_forward` -- ``torch.func.functional_call`` with the parameters taken from a flat vector;
  differentiable w.r.t. the flat vector and the input, including ``create_graph`` double-backward
  (trajectory matching, Cazenavette et al. CVPR 2022, eq. 2-3).
- :func:`batched_forward` -- ``torch.func.vmap`` of the above over ``K`` flat vectors (several experts or
  evaluation runs at once).

Batch-norm buffers in the functional helpers: :func:`functional_forward` uses the module's own buffers;
in ``train()`` mode it normalises with the batch statistics and, with ``track_bn_stats=True`` (default),
updates the module's running statistics in place exactly like ``model(x)``; with ``track_bn_stats=False``
the running statistics are left untouched. :func:`batched_forward` never updates running statistics
(in-place updates cannot be vmapped): in ``train()`` mode every one of the K runs normalises with its own
batch statistics, in ``eval()`` mode all K runs read the module's (shared) running statistics.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torchvision.models.resnet import BasicBlock, ResNet as _TVResNet

from .config import Config, option
from .ops.convnet import avg_pool_2x2, conv2d, norm_act_pool

__all__ = [
    "ConvNet",
    "InstanceNormActPool",
    "Conv2d",
    "AvgPool2x2",
    "ActPool",
    "fused_default",
    "ConvNetD4",
    "ResNet18",
    "convnet_datm",
    "convnet_rcig",
    "resnet18",
    "get_model",
    "MODEL_NAMES",
    "NetConfig",
    "flat_params",
    "param_shapes",
    "num_params",
    "unflatten",
    "load_flat",
    "functional_forward",
    "batched_forward",
    "features",
    "has_batchnorm",
]

_OUTPUTS = ("logits", "embed", "both")


def _pair(im_size, name="im_size") -> Tuple[int, int]:
    if isinstance(im_size, int):
        im_size = (im_size, im_size)
    try:
        h, w = (int(v) for v in im_size)
    except Exception:
        raise ValueError(f"{name} must be an int or a pair of ints, got {im_size!r}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"{name} must be positive, got {im_size!r}")
    return h, w


def _check_output(output: str) -> None:
    if output not in _OUTPUTS:
        raise ValueError(f"output must be one of {_OUTPUTS}, got {output!r}")


def _head(emb: torch.Tensor, classifier: nn.Module, output: str):
    if output == "embed":
        return emb
    logits = classifier(emb)
    if output == "both":
        return logits, emb
    return logits


def fused_default() -> bool:
    """Whether ConvNets use the fused block (:class:`InstanceNormActPool`, :class:`ActPool`) by default: True
    unless the environment sets ``DDFAST_FUSED=0`` (the plain ``GroupNorm -> ReLU -> AvgPool2d`` modules)."""
    return os.environ.get("DDFAST_FUSED", "1").strip().lower() not in ("0", "false", "no", "off")


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters, same function) computed by :func:`ddfast.ops.conv2d`: a backward that is
    differentiable with convolution kernels (a faster double backward: DATM's unroll, TESLA) and direct CPU kernels
    for a grayscale first layer. Other ``padding_mode`` values fall back to ``nn.Conv2d``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros":
            return super().forward(x)
        return conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class AvgPool2x2(nn.AvgPool2d):
    """``nn.AvgPool2d(2, 2)`` computed as strided sums (:func:`ddfast.ops.avg_pool_2x2`: faster than ATen's pooling
    kernels on a CPU, differentiable to any order)."""

    def __init__(self):
        super().__init__(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return avg_pool_2x2(x)


class InstanceNormActPool(nn.Module):
    """Instance norm with affine parameters (as ``GroupNorm(C, C)``), then ReLU or softplus, then 2x2 average pooling
    (or none), computed by the fused :func:`ddfast.ops.norm_act_pool`.

    It holds the norm's parameters under ``GroupNorm``'s names (``weight`` = 1 and ``bias`` = 0 at
    initialisation, shape ``[C]``) and its ``eps``, so state dicts and flat parameter vectors are those of the plain
    modules; in a :class:`ConvNet` the activation and pooling slots after it hold ``nn.Identity`` (the layout of
    the plain block is kept).

    Args:
        channels: C. act: ``"relu"`` or ``"softplus"``; softplus_beta: its sharpness. pool: 2x2 average pooling.
        eps: added to the variance (GroupNorm's default).
    """

    def __init__(self, channels: int, act: str = "relu", softplus_beta: float = 60.0, pool: bool = True,
                 eps: float = 1e-5):
        super().__init__()
        self.num_channels, self.eps = int(channels), float(eps)
        self.act, self.softplus_beta, self.pool = act, float(softplus_beta), bool(pool)
        self.weight = nn.Parameter(torch.ones(self.num_channels))
        self.bias = nn.Parameter(torch.zeros(self.num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return norm_act_pool(x, self.weight, self.bias, act=self.act, softplus_beta=self.softplus_beta,
                             pool=self.pool, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}, act={self.act!r}, pool={self.pool}"


class ActPool(nn.Module):
    """ReLU or softplus followed by 2x2 average pooling, fused (:func:`ddfast.ops.norm_act_pool` without
    normalisation): the block of RCIG's ConvNet. In a :class:`ConvNet` it sits in the activation slot and the
    pooling slot holds ``nn.Identity``."""

    def __init__(self, act: str = "relu", softplus_beta: float = 60.0):
        super().__init__()
        self.act, self.softplus_beta = act, float(softplus_beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return norm_act_pool(x, None, None, act=self.act, softplus_beta=self.softplus_beta, pool=True)

    def extra_repr(self) -> str:
        return f"act={self.act!r}, softplus_beta={self.softplus_beta}"


class ConvNet(nn.Module):
    """ConvNet-D: ``depth`` x [Conv3x3 -> norm -> act -> pool 2x2] -> flatten -> Linear.

    Args:
        in_channels: image channels C (1 or 3 usually).
        num_classes: output classes.
        width: channels of every conv layer (ignored when ``widths`` is given). 128 in DATM/MTT/DANCE.
        depth: number of conv blocks (3 for 28/32 px, 4 for 64 px, 5 for 128 px).
        norm: ``"instance"`` (``GroupNorm(c, c)`` with affine, as MTT/DATM implement instance norm),
            ``"batch"`` (``BatchNorm2d``), ``"layer"`` (``GroupNorm(1, c)``) or ``"none"``.
        act: ``"relu"`` or ``"softplus"`` (``F.softplus(x, beta=softplus_beta)``; RCIG uses beta 60 while
            distilling, Loo et al. 2023 §3 "convexification").
        softplus_beta: softplus sharpness (only with ``act="softplus"``).
        pool: ``"avg"`` (default), ``"max"`` or ``"none"`` (2x2, stride 2).
        im_size: input ``(H, W)`` or int; fixes the classifier's input size.
        widths: per-layer channels, e.g. ``(128, 256, 512)`` for RCIG; overrides ``width``/``depth``
            (``depth = len(widths)``).
        first_padding: padding of the first conv; default ``3`` for 1-channel 28x28 input (MTT's trick:
            28x28 is treated as 32x32), else ``1``.
        fused: compute instance norm + activation + average pooling (and activation + average pooling without
            normalisation) with the fused :func:`ddfast.ops.norm_act_pool` (:class:`InstanceNormActPool`,
            :class:`ActPool`), the convolutions with :func:`ddfast.ops.conv2d` (:class:`Conv2d`: a faster double
            backward, direct kernels for the first layer) and the average pooling with
            :func:`ddfast.ops.avg_pool_2x2` (:class:`AvgPool2x2`); default :func:`fused_default` (True). The
            parameters, their names and the flat layout are those of the plain modules, so both give the same
            function up to float rounding.

    Attributes:
        features: ``nn.Sequential`` of the conv blocks.
        classifier: the final ``nn.Linear(feature_dim, num_classes)``.
        feature_dim: D = last width x final H x final W (2048 for width 128 on 32x32 or 1x28x28).
        feature_shape: ``(C, H, W)`` of the last feature map.

    Raises:
        ValueError: a non-positive size, an unknown ``norm``/``act``/``pool``, or an image too small
            for ``depth`` pooling layers (feature map would vanish).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        width: int = 128,
        depth: int = 3,
        norm: str = "instance",
        act: str = "relu",
        softplus_beta: float = 60.0,
        pool: str = "avg",
        im_size: Union[int, Sequence[int]] = (32, 32),
        widths: Optional[Sequence[int]] = None,
        first_padding: Optional[int] = None,
        fused: Optional[bool] = None,
    ):
        super().__init__()
        if int(in_channels) <= 0:
            raise ValueError(f"in_channels must be positive, got {in_channels!r}")
        if int(num_classes) <= 1:
            raise ValueError(f"num_classes must be >= 2, got {num_classes!r}")
        h, w = _pair(im_size)
        if widths is None:
            if int(depth) <= 0:
                raise ValueError(f"depth must be positive, got {depth!r}")
            if int(width) <= 0:
                raise ValueError(f"width must be positive, got {width!r}")
            widths = [int(width)] * int(depth)
        else:
            widths = [int(c) for c in widths]
            if not widths or min(widths) <= 0:
                raise ValueError(f"widths must be a non-empty sequence of positive ints, got {widths!r}")
        if norm not in ("instance", "batch", "layer", "none"):
            raise ValueError(f"norm must be 'instance', 'batch', 'layer' or 'none', got {norm!r}")
        if act not in ("relu", "softplus"):
            raise ValueError(f"act must be 'relu' or 'softplus', got {act!r}")
        if act == "softplus" and not float(softplus_beta) > 0:
            raise ValueError(f"softplus_beta must be > 0, got {softplus_beta!r}")
        if pool not in ("avg", "max", "none"):
            raise ValueError(f"pool must be 'avg', 'max' or 'none', got {pool!r}")
        if first_padding is None:
            first_padding = 3 if (int(in_channels) == 1 and (h, w) == (28, 28)) else 1
        if int(first_padding) < 0:
            raise ValueError(f"first_padding must be >= 0, got {first_padding!r}")

        self.in_channels = int(in_channels)
        self.num_classes = int(num_classes)
        self.widths = tuple(widths)
        self.depth = len(widths)
        self.norm = norm
        self.act = act
        self.softplus_beta = float(softplus_beta)
        self.pool = pool
        self.im_size = (h, w)
        self.first_padding = int(first_padding)

        self.fused = fused_default() if fused is None else bool(fused)
        layers: List[nn.Module] = []
        c_in = self.in_channels
        for i, c in enumerate(widths):
            pad = self.first_padding if i == 0 else 1
            layers.append((Conv2d if self.fused else nn.Conv2d)(c_in, c, kernel_size=3, padding=pad))
            h, w = h + 2 * pad - 2, w + 2 * pad - 2
            layers += self._block(c)
            if pool != "none":
                h, w = h // 2, w // 2
            if h <= 0 or w <= 0:
                raise ValueError(
                    f"im_size {self.im_size} is too small for depth {self.depth}: the feature map vanishes "
                    f"after block {i + 1}"
                )
            c_in = c
        self.features = nn.Sequential(*layers)
        self.feature_shape = (c_in, h, w)
        self.feature_dim = c_in * h * w
        self.classifier = nn.Linear(self.feature_dim, self.num_classes)

    def _block(self, c: int) -> List[nn.Module]:
        """The modules after a convolution of ``c`` channels: ``[norm] act [pool]`` (the fused modules keep the
        slots, with ``nn.Identity`` where the fused module already did the work)."""
        act = nn.ReLU() if self.act == "relu" else nn.Softplus(beta=self.softplus_beta)
        avg = AvgPool2x2() if self.fused else nn.AvgPool2d(2, 2)
        pool = [] if self.pool == "none" else [avg if self.pool == "avg" else nn.MaxPool2d(2, 2)]
        fuse = self.fused
        if fuse and self.norm == "instance" and self.pool in ("avg", "none"):
            return [InstanceNormActPool(c, self.act, self.softplus_beta, pool=self.pool == "avg"), nn.Identity()] + \
                [nn.Identity() for _ in pool]
        if fuse and self.norm == "none" and self.pool == "avg":
            return [ActPool(self.act, self.softplus_beta), nn.Identity()]
        norm = {"instance": [nn.GroupNorm(c, c, affine=True)], "batch": [nn.BatchNorm2d(c)],
                "layer": [nn.GroupNorm(1, c, affine=True)], "none": []}[self.norm]
        return norm + [act] + pool

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features: ``float [N, C, H, W] -> [N, feature_dim]`` (flattened last feature map)."""
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor, output: str = "logits"):
        """``x float [N, C, H, W]`` -> logits ``[N, num_classes]`` (``output="logits"``), features
        ``[N, feature_dim]`` (``"embed"``) or the pair ``(logits, features)`` (``"both"``)."""
        _check_output(output)
        return _head(self.embed(x), self.classifier, output)

    def extra_repr(self) -> str:
        return (f"widths={self.widths}, norm={self.norm!r}, act={self.act!r}, pool={self.pool!r}, "
                f"im_size={self.im_size}, feature_dim={self.feature_dim}, fused={self.fused}")


class ConvNetD4(ConvNet):
    """:class:`ConvNet` of depth 4 (for 64x64 inputs such as Tiny-ImageNet; MTT/DATM ``ConvNetD4``).

    Same arguments as :class:`ConvNet` except ``depth`` (fixed to 4); ``im_size`` defaults to 64x64.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 128, norm: str = "instance",
                 act: str = "relu", softplus_beta: float = 60.0, pool: str = "avg",
                 im_size: Union[int, Sequence[int]] = (64, 64), first_padding: Optional[int] = None,
                 fused: Optional[bool] = None):
        super().__init__(in_channels, num_classes, width=width, depth=4, norm=norm, act=act,
                         softplus_beta=softplus_beta, pool=pool, im_size=im_size, first_padding=first_padding,
                         fused=fused)


def convnet_datm(in_channels: int, num_classes: int, im_size=(32, 32), width: int = 128, depth: int = 3,
                 **kw) -> ConvNet:
    """The DATM/MTT/FTD/TESLA/DANCE ConvNet (MTT/DATM's ``networks.py``): width 128, ``GroupNorm(C, C)`` instance
    norm with affine, ReLU, average pooling. 320,010 parameters for CIFAR-10 (3x32x32, 10 classes),
    504,420 for CIFAR-100. Extra keywords go to :class:`ConvNet`."""
    kw.setdefault("norm", "instance")
    kw.setdefault("act", "relu")
    kw.setdefault("pool", "avg")
    return ConvNet(in_channels, num_classes, width=width, depth=depth, im_size=im_size, **kw)


def _rcig_depth(im_size) -> int:
    h, w = _pair(im_size)
    s = max(h, w)
    if s <= 32:
        return 3
    if s <= 64:
        return 4
    return 5


def convnet_rcig(in_channels: int, num_classes: int, im_size=(32, 32), depth: Optional[int] = None,
                 act: str = "relu", softplus_beta: float = 60.0, base_width: int = 128,
                 norm: str = "none", **kw) -> ConvNet:
    """RCIG's ``Conv`` (Loo, Hasani, Lechner, Rus; ICML 2023; ``yolky/RCIG`` ``models.py``): widths
    ``base_width * 2**i`` (128, 256, 512 at depth 3), no normalisation, average pooling, final Dense.

    Args:
        depth: 3/4/5 for 32/64/128 px; default from ``im_size``.
        act: ``"relu"`` (default: RCIG's evaluation network) or ``"softplus"`` (distillation at depth 3,
            ``softplus_beta`` 60).
        norm: ``"none"`` (RCIG default) or ``"batch"`` (RCIG's ``has_bn``).

    Parameters at 32 px: body 1,478,912 (conv weights and biases) + final layer ``8192*C + C``.
    1-channel 28x28 input uses MTT's padding-3 first conv, giving the same 4x4x512 = 8192 features.
    """
    if depth is None:
        depth = _rcig_depth(im_size)
    if int(depth) <= 0:
        raise ValueError(f"depth must be positive, got {depth!r}")
    widths = [int(base_width) * 2 ** i for i in range(int(depth))]
    return ConvNet(in_channels, num_classes, norm=norm, act=act, softplus_beta=softplus_beta, pool="avg",
                   im_size=im_size, widths=widths, **kw)


def _instance_norm_layer(c: int) -> nn.Module:
    return nn.GroupNorm(c, c, affine=True)


class ResNet18(_TVResNet):
    """torchvision's ResNet-18 (He et al., CVPR 2016; ``torchvision.models.resnet18`` architecture:
    BasicBlock x [2, 2, 2, 2]) with the small-image stem used for CIFAR-size inputs: the first conv is
    3x3, stride 1, padding 1 and the max pool is removed. ``norm="batch"`` (default, DATM's ``ResNet18BN``)
    or ``"instance"`` (``GroupNorm(C, C)``, DATM's ``ResNet18``). ``feature_dim`` = 512 (global average
    pool). Input ``float [N, in_channels, H, W]`` of any size >= 8x8."""

    def __init__(self, in_channels: int, num_classes: int, norm: str = "batch", im_size=(32, 32)):
        if int(in_channels) <= 0:
            raise ValueError(f"in_channels must be positive, got {in_channels!r}")
        if int(num_classes) <= 1:
            raise ValueError(f"num_classes must be >= 2, got {num_classes!r}")
        if norm not in ("batch", "instance"):
            raise ValueError(f"norm must be 'batch' or 'instance', got {norm!r}")
        norm_layer = nn.BatchNorm2d if norm == "batch" else _instance_norm_layer
        super().__init__(BasicBlock, [2, 2, 2, 2], num_classes=int(num_classes), norm_layer=norm_layer)
        self.conv1 = nn.Conv2d(int(in_channels), 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.maxpool = nn.Identity()
        self.in_channels = int(in_channels)
        self.num_classes = int(num_classes)
        self.im_size = _pair(im_size)
        self.norm = norm
        self.feature_dim = 512 * BasicBlock.expansion

    @property
    def classifier(self) -> nn.Linear:
        """The final ``nn.Linear`` (torchvision's ``fc``)."""
        return self.fc

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Globally pooled features ``[N, 512]``."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.maxpool(x)))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor, output: str = "logits"):  # noqa: D102 (same contract as ConvNet)
        _check_output(output)
        return _head(self.embed(x), self.fc, output)


def resnet18(in_channels: int, num_classes: int, im_size=(32, 32), norm: str = "batch") -> ResNet18:
    """:class:`ResNet18` (torchvision's ResNet-18 with a 3x3 stride-1 stem and no max pool)."""
    return ResNet18(in_channels, num_classes, norm=norm, im_size=im_size)


MODEL_NAMES = ("convnet", "convnet_datm", "convnet_rcig", "convnetd4", "resnet18", "resnet18_in")


def get_model(name: str, in_channels: int, num_classes: int, im_size=(32, 32), seed: Optional[int] = None,
              **kw) -> nn.Module:
    """Builds a model by name.

    Names: ``"convnet"`` / ``"convnet_datm"`` (:func:`convnet_datm`; keywords of :class:`ConvNet` such as
    ``width``, ``depth``, ``norm``, ``act`` are accepted), ``"convnet_rcig"`` (:func:`convnet_rcig`),
    ``"convnetd4"`` (:class:`ConvNetD4`), ``"resnet18"`` (batch norm) and ``"resnet18_in"`` (instance norm).

    Args:
        seed: when given, the parameters are initialised under ``torch.manual_seed(seed)`` inside
            ``torch.random.fork_rng`` (the global RNG is left untouched); same seed -> same weights.
            ``None`` draws from the global RNG (PyTorch's default initialisation either way).

    Raises:
        ValueError: unknown ``name`` (the message lists the valid names) or bad sizes.
        TypeError: a keyword the chosen model does not take.
    """
    key = str(name).lower().replace("-", "_")
    builders = {
        "convnet": convnet_datm,
        "convnet_datm": convnet_datm,
        "convnet_rcig": convnet_rcig,
        "convnetd4": lambda c, n, im_size, **k: ConvNetD4(c, n, im_size=im_size, **k),
        "resnet18": lambda c, n, im_size, **k: resnet18(c, n, im_size=im_size, **k),
        "resnet18_in": lambda c, n, im_size, **k: resnet18(c, n, im_size=im_size, norm="instance", **k),
    }
    if key not in builders:
        raise ValueError(f"unknown model name {name!r}; choose one of {sorted(builders)}")
    if seed is None:
        return builders[key](in_channels, num_classes, im_size, **kw)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return builders[key](in_channels, num_classes, im_size, **kw)


_CONVNET_NAMES = ("convnet", "convnet_datm")


@dataclass
class NetConfig(Config):
    """A network by name and size: what expert trajectories, model pools and TAD's scoring network build.

    Attributes:
        model: a :func:`get_model` name (``"convnet"``: the ConvNet-D of MTT/DATM/DANCE).
        width, depth, norm: the ConvNet's width, number of blocks and normalisation (``"instance"``,
            ``"batch"``, ``"layer"``, ``"none"``); used only by the ConvNet names (``convnet``, ``convnet_datm``).
    """

    model: str = option("convnet")
    width: int = option(128, ge=1)
    depth: int = option(3, ge=1)
    norm: str = option("instance", choices=("instance", "batch", "layer", "none"))

    def check(self) -> None:
        if str(self.model).lower().replace("-", "_") not in MODEL_NAMES:
            self.fail("model", f"unknown model {self.model!r}; choose one of {list(MODEL_NAMES)}")

    @property
    def is_convnet(self) -> bool:
        return str(self.model).lower().replace("-", "_") in _CONVNET_NAMES

    def kwargs(self) -> Dict[str, object]:
        """The :func:`get_model` keywords (width, depth and norm for the ConvNet names, none otherwise)."""
        return {"width": self.width, "depth": self.depth, "norm": self.norm} if self.is_convnet else {}

    def build(self, in_channels: int, num_classes: int, im_size, seed: Optional[int] = None) -> nn.Module:
        """``get_model(model, in_channels, num_classes, im_size, seed=seed, **kwargs())``."""
        return get_model(self.model, in_channels, num_classes, im_size, seed=seed, **self.kwargs())


# --------------------------------------------------------------------------------------------------------
# functional helpers
# --------------------------------------------------------------------------------------------------------


def param_shapes(model: nn.Module) -> List[Tuple[str, torch.Size]]:
    """``[(name, shape), ...]`` in the flat order (``model.named_parameters()`` order)."""
    return [(n, p.shape) for n, p in model.named_parameters()]


def num_params(model: nn.Module) -> int:
    """Number of scalar parameters P (the length of :func:`flat_params`)."""
    return sum(p.numel() for p in model.parameters())


def flat_params(model: nn.Module) -> torch.Tensor:
    """All parameters as one vector ``[P]`` (same dtype/device as the parameters).

    Order: ``model.named_parameters()`` (registration order), each tensor flattened row-major. This is
    the layout of MTT's ``ReparamModule.flat_param`` for the ConvNet, so expert snapshots are comparable.
    The result is a new tensor (``torch.cat``) carrying autograd history if the parameters require grad;
    call ``.detach()`` for a snapshot.
    """
    ps = [p.reshape(-1) for p in model.parameters()]
    if not ps:
        raise ValueError("model has no parameters")
    return torch.cat(ps)


def _check_flat(model: nn.Module, flat: torch.Tensor, batched: bool = False) -> int:
    if not isinstance(flat, torch.Tensor):
        raise TypeError(f"flat must be a torch.Tensor, got {type(flat).__name__}")
    P = num_params(model)
    want = 2 if batched else 1
    name = "flats" if batched else "flat"
    if flat.dim() != want or flat.shape[-1] != P:
        shape = "[K, P]" if batched else "[P]"
        raise ValueError(f"{name} must have shape {shape} with P={P} for this model, got {tuple(flat.shape)}")
    if not flat.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got {flat.dtype}")
    return P


def unflatten(model: nn.Module, flat: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Splits ``flat [P]`` into ``{name: view}`` shaped like ``model``'s parameters (views of ``flat``,
    so gradients flow back to it). Raises ``ValueError`` if ``flat`` does not have length P."""
    _check_flat(model, flat)
    named = list(model.named_parameters())
    # one split, not a slice per tensor: its backward concatenates the pieces' gradients once, where slices
    # would each scatter into a zero tensor of size P (measured: ~7 % of a DATM unroll iteration on a CPU)
    pieces = flat.split([p.numel() for _, p in named])
    return {name: piece.view(p.shape) for (name, p), piece in zip(named, pieces)}


@torch.no_grad()
def load_flat(model: nn.Module, flat: torch.Tensor) -> nn.Module:
    """Copies ``flat [P]`` into ``model``'s parameters in place (inverse of :func:`flat_params`)."""
    for p, v in zip(model.parameters(), unflatten(model, flat.detach()).values()):
        p.copy_(v)
    return model


@contextlib.contextmanager
def _bn_stats_frozen(model: nn.Module) -> Iterator[None]:
    """Temporarily stops batch norms in train mode from reading or updating running statistics
    (they normalise with batch statistics); eval-mode batch norms keep reading their running stats."""
    changed = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats:
            m.track_running_stats = False
            changed.append(m)
    try:
        yield
    finally:
        for m in changed:
            m.track_running_stats = True


def has_batchnorm(model: nn.Module) -> bool:
    """True if ``model`` contains a batch-norm layer (running-statistic buffers)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def functional_forward(model: nn.Module, flat: torch.Tensor, x: torch.Tensor, output: str = "logits",
                       track_bn_stats: bool = True):
    """``model(x)`` evaluated with the parameters taken from ``flat`` (``torch.func.functional_call``).

    Args:
        model: any ddfast model (its own parameters are ignored, its buffers are used).
        flat: ``float [P]`` in the order of :func:`flat_params`; may require grad.
        x: ``float [N, C, H, W]``; may require grad.
        output: ``"logits"`` -> ``[N, num_classes]``, ``"embed"`` -> ``[N, D]``, ``"both"`` -> pair.
        track_bn_stats: in train mode, whether batch norms update the module's running statistics.

    Differentiable w.r.t. ``flat`` and ``x`` to any order (``torch.autograd.grad(..., create_graph=True)``
    then backward again), as MTT/DATM's unrolled student updates need (Cazenavette et al. 2022, eq. 2).

    Raises:
        ValueError: ``flat`` of the wrong length, bad ``output``.
    """
    from torch.func import functional_call

    _check_output(output)
    params = unflatten(model, flat)
    ctx = contextlib.nullcontext() if track_bn_stats else _bn_stats_frozen(model)
    with ctx:
        return functional_call(model, params, (x,), {"output": output}, strict=False)


def batched_forward(model: nn.Module, flats: torch.Tensor, x: torch.Tensor, output: str = "logits",
                    x_batched: Optional[bool] = None, chunk_size: Optional[int] = None):
    """``K`` forwards at once with ``torch.func.vmap`` over stacked flat parameter vectors.

    Args:
        flats: ``float [K, P]`` (K parameter vectors in :func:`flat_params` order).
        x: ``[N, C, H, W]`` shared by all K, or ``[K, N, C, H, W]`` (one batch per parameter vector).
        x_batched: force the interpretation of ``x``; default: batched iff ``x.dim() == 5``.
        chunk_size: passed to ``vmap`` to bound memory.

    Returns:
        ``[K, N, num_classes]`` (or ``[K, N, D]`` / a pair for ``output="embed"`` / ``"both"``); entry k
        equals ``functional_forward(model, flats[k], x or x[k])`` (batch norm: see the module docstring;
        running statistics are never updated here).

    Raises:
        ValueError: wrong ``flats`` shape, or batched ``x`` whose first dimension is not K.
    """
    from torch.func import functional_call, vmap

    _check_output(output)
    _check_flat(model, flats, batched=True)
    K = flats.shape[0]
    if x_batched is None:
        x_batched = x.dim() == 5
    if x_batched and x.shape[0] != K:
        raise ValueError(f"batched x must have first dimension K={K}, got shape {tuple(x.shape)}")
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]

    def one(flat_k, x_k):
        params = {n: t.view(s) for n, t, s in zip(names, torch.split(flat_k, sizes), shapes)}
        return functional_call(model, params, (x_k,), {"output": output}, strict=False)

    with _bn_stats_frozen(model):
        return vmap(one, in_dims=(0, 0 if x_batched else None), chunk_size=chunk_size,
                    randomness="different")(flats, x)


def features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Penultimate features ``model.embed(x)``: ``[N, C, H, W] -> [N, feature_dim]``."""
    return model.embed(x)
