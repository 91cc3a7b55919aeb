"""TAD's consistency regularisation of the synthetic set (a [ddfast] design; TAD's paper names a consistency
regularisation without defining it)."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..augment import DSA, Normalize
from ..distill.base import Distiller
from .config import TADConfig
from .scorer import tad_seed

__all__ = ["ConsistencyRegularizer"]


class ConsistencyRegularizer:
    """TAD's consistency regularisation on the synthetic set, passed to ``Distiller.run(extra_loss=...)`` [ddfast].

    ``L = lambda * (CE(f(A_1(x)), t) + CE(f(A_2(x)), t)) / 2`` over the synthetic images ``x`` handed to the
    hook, where f is the (frozen) scoring network, ``A_1, A_2`` two DSA draws (Zhao & Bilen 2021) and ``t`` the
    image's label as a distribution (``consistency_target``): softmax of logit labels (DATM), one-hot of hard
    labels, one-hot of the argmax of RCIG's regression targets (``"auto"``). The images are mapped from the
    distiller's input space to f's (``(x_pixels - mean) / std``) by inverting the distiller's transform (read
    from ``distiller.synthetic_set().preprocess`` on the first call; ZCA included). Gradients flow to the
    images (and, with ``consistency_label_grad``, to learnable labels); f's parameters are frozen.

    DSA seeds derive from ``(config.seed, distiller.iteration, call index within the iteration)``, so a
    resumed distillation draws the same views as an uninterrupted one.

    Call: ``reg(images float [M, C, H, W], labels int64 [M] | float [M, num_classes]) -> scalar Tensor``.
    Raises ``ValueError`` for mismatched shapes.
    """

    def __init__(self, model: nn.Module, config: TADConfig, mean, std, distiller: Optional[Distiller] = None,
                 to_scorer: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.config = config
        self.lam = float(config.consistency_lambda)
        self.dsa = DSA(config.consistency_dsa) if config.consistency_dsa else None
        self.norm = Normalize(mean, std)
        self.distiller = distiller
        self._to_scorer = to_scorer
        self._mse_labels = None
        self._calls = (-1, 0)

    def _mapping(self, device):
        if self._to_scorer is None:
            if self.distiller is None:
                raise ValueError("ConsistencyRegularizer needs a distiller or an explicit to_scorer mapping")
            syn = self.distiller.synthetic_set()
            t = syn.input_transform()
            self._mse_labels = (syn.eval_config or {}).get("loss") == "mse"
            norm = self.norm.to(device)
            t = t.to(device) if hasattr(t, "to") else t
            self._to_scorer = lambda x: norm.transform(t.inverse(x))
        return self._to_scorer

    def target(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        """``float [M, C]`` target distribution of ``labels`` (see class docstring)."""
        mode = self.config.consistency_target
        if not labels.is_floating_point():
            return F.one_hot(labels.long(), num_classes).float()
        lab = labels if self.config.consistency_label_grad else labels.detach()
        if mode == "hard" or (mode == "auto" and self._mse_labels):
            return F.one_hot(lab.argmax(1), num_classes).float()
        return torch.softmax(lab, dim=1)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"consistency: images [M, C, H, W] and labels [M, ...] expected, got "
                             f"{tuple(images.shape)} and {tuple(labels.shape)}")
        to_f = self._mapping(images.device)
        self.model.to(images.device)
        it = int(self.distiller.iteration) if self.distiller is not None else 0
        k = self._calls[1] + 1 if self._calls[0] == it else 0
        self._calls = (it, k)
        x = to_f(images)
        logits_a = self.model(self.dsa(x, tad_seed(self.config.seed, 41, it, k, 0)) if self.dsa else x)
        logits_b = self.model(self.dsa(x, tad_seed(self.config.seed, 41, it, k, 1)) if self.dsa else x)
        t = self.target(labels, logits_a.shape[1]).to(logits_a.dtype)
        ce = lambda z: -(t * torch.log_softmax(z, 1)).sum(1).mean()  # noqa: E731
        return self.lam * 0.5 * (ce(logits_a) + ce(logits_b))
