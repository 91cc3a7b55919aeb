"""Shared pieces of the ports: the ConvNet as the official repositories define it, and MTT's flat-parameter
wrapper (ReparamModule)."""
from __future__ import annotations

import torch
import torch.nn as nn

C, HW = 10, 28  # the benchmarks' shape: Fashion-MNIST (1x28x28, 10 classes)


class PlainConvNet(nn.Module):
    """ConvNet-D as the official repos define it: [Conv3x3 -> GroupNorm(c, c) | nothing -> ReLU | Softplus ->
    AvgPool2x2] x depth -> flatten -> Linear. 1-channel 28x28 input: first conv padded by 3 (28 treated as 32).
    Parameter order = registration order (the flat layout of the experts / pools)."""

    def __init__(self, widths, norm: str = "instance", act: str = "relu", beta: float = 60.0, cin: int = 1,
                 classes: int = C, im: int = HW):
        super().__init__()
        layers, c, h = [], cin, im
        for i, w in enumerate(widths):
            pad = 3 if (cin == 1 and im == 28 and i == 0) else 1
            layers.append(nn.Conv2d(c, w, 3, padding=pad))
            h = h + 2 * pad - 2
            if norm == "instance":
                layers.append(nn.GroupNorm(w, w, affine=True))
            layers.append(nn.ReLU() if act == "relu" else nn.Softplus(beta=beta))
            layers.append(nn.AvgPool2d(2, 2))
            h //= 2
            c = w
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c * h * h, classes)

    def embed(self, x):
        return self.features(x).flatten(1)

    def forward(self, x, both: bool = False):
        e = self.embed(x)
        out = self.classifier(e)
        return (e, out) if both else out


class FlatParamNet:
    """MTT's ReparamModule idea: the module's parameters are removed and, before every call, views of ONE flat
    vector are set as plain attributes of the sub-modules, then the module runs as usual."""

    def __init__(self, net: nn.Module):
        self.net = net
        self.slots = []
        for mod in net.modules():
            for name, p in list(mod._parameters.items()):
                if p is not None:
                    self.slots.append((mod, name, p.shape, p.numel()))
        self.flat0 = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
        for mod, name, _, _ in self.slots:
            del mod._parameters[name]
        self.numels = [s[3] for s in self.slots]
        self.P = sum(self.numels)

    def _attach(self, flat):
        for (mod, name, shape, _), t in zip(self.slots, flat.split(self.numels)):
            setattr(mod, name, t.view(shape))

    def __call__(self, flat, x):
        self._attach(flat)
        return self.net(x)

    def embed(self, flat, x):
        self._attach(flat)
        return self.net.embed(x)


def _plain_net_from_template(template: nn.Module, act="relu", norm="instance", beta=60.0) -> PlainConvNet:
    widths = [m.out_channels for m in template.modules() if isinstance(m, nn.Conv2d)]
    return PlainConvNet(widths, norm=norm, act=act, beta=beta)


def _load_flat_plain(net: nn.Module, flat: torch.Tensor) -> None:
    with torch.no_grad():
        off = 0
        for p in net.parameters():
            p.copy_(flat[off:off + p.numel()].view(p.shape))
            off += p.numel()
