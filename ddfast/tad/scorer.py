"""TAD's scoring network f: its training passes, scoring passes and K-fold out-of-sample predictions."""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..augment import DSA, Normalize
from ..hashing import derive_seed
from .config import TADConfig

__all__ = ["TrustScorer", "kfold_pred_probs", "tad_seed"]


def tad_seed(*parts: int) -> int:
    """TAD's 62-bit seeds from integers (:func:`ddfast.hashing.derive_seed`, domain ``"tad:"``)."""
    return derive_seed(*parts, domain="tad:", sep=":", bits=62)


class TrustScorer:
    """The scoring network f of TAD and its training/scoring passes [ddfast].

    Args:
        config: :class:`TADConfig` (its ``scorer`` sub-config and ``seed``).
        in_channels, num_classes, im_size: data geometry.
        mean, std: per-channel statistics; f sees ``(x - mean) / std`` (:class:`ddfast.augment.Normalize`).
        device: where f trains and scores.
    """

    def __init__(self, config: TADConfig, in_channels: int, num_classes: int, im_size, mean, std,
                 device: Union[str, torch.device] = "cpu"):
        self.config = config
        self.in_channels, self.num_classes, self.im_size = int(in_channels), int(num_classes), tuple(im_size)
        self.device = torch.device(device)
        self.norm = Normalize(mean, std).to(self.device)
        self.model = self.new_model(0)

    def new_model(self, version: int) -> nn.Module:
        """A freshly initialised f (seeded by ``config.seed`` and ``version``)."""
        cfg = self.config
        try:
            m = cfg.scorer.net.build(self.in_channels, self.num_classes, self.im_size,
                                     seed=tad_seed(cfg.seed, 11, version) % (2 ** 31))
        except ValueError as exc:
            raise ValueError(f"TADConfig.scorer.net: {exc}") from None
        return m.to(self.device)

    def train(self, images: torch.Tensor, labels: torch.Tensor, epochs: float, seed: int,
              model: Optional[nn.Module] = None) -> nn.Module:
        """Trains ``model`` (default: ``self.model``) with SGD for ``epochs`` (float) passes over
        ``(images [n, C, H, W] in [0, 1], labels int64 [n])``, cross-entropy, batches drawn with a generator
        seeded by ``seed``. Returns the model in eval mode."""
        cfg = self.config.scorer
        model = self.model if model is None else model
        n = images.shape[0]
        if n == 0:
            raise ValueError("TrustScorer.train: no samples to train on")
        g = torch.Generator().manual_seed(int(seed))
        if cfg.max_samples and n > cfg.max_samples:
            keep = torch.randperm(n, generator=g)[: cfg.max_samples]
            images, labels, n = images[keep], labels[keep], cfg.max_samples
        bs = min(cfg.batch_size, n)
        per_epoch = math.ceil(n / bs)
        steps = max(1, int(math.ceil(float(epochs) * per_epoch)))
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        dsa = DSA() if cfg.dsa else None
        model.train()
        perm = None
        for s in range(steps):
            b = s % per_epoch
            if b == 0:
                perm = torch.randperm(n, generator=g)
            idx = perm[b * bs:(b + 1) * bs]
            xb = self.norm.transform(images[idx].to(self.device, torch.float32))
            if dsa is not None:
                xb = dsa(xb, int(torch.randint(2 ** 62, (1,), generator=g)))
            loss = F.cross_entropy(model(xb), labels[idx].to(self.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        return model

    @torch.no_grad()
    def score(self, images: torch.Tensor, model: Optional[nn.Module] = None,
              batch_size: int = 1024) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(logits float32 [N, C], features float32 [N, D])`` of f (eval mode) on CPU."""
        model = self.model if model is None else model
        model.eval()
        logits, feats = [], []
        for i in range(0, images.shape[0], batch_size):
            x = self.norm.transform(images[i:i + batch_size].to(self.device, torch.float32))
            z, h = model(x, output="both")
            logits.append(z.float().cpu())
            feats.append(h.float().cpu())
        return torch.cat(logits), torch.cat(feats)


def kfold_pred_probs(scorer: TrustScorer, images: torch.Tensor, labels: torch.Tensor, folds: int,
                     seed: int) -> torch.Tensor:
    """Out-of-sample predicted probabilities ``float32 [N, C]``: K warm-up networks (same recipe as f), each
    trained on K-1 folds and scoring the held-out fold (cleanlab's intended input). Folds are a seeded random
    split. Raises ``ValueError`` for ``folds < 2``."""
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    N = images.shape[0]
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(tad_seed(seed, 31)))
    probs = torch.empty(N, scorer.num_classes)
    for k in range(folds):
        held = perm[k::folds]
        mask = torch.ones(N, dtype=torch.bool)
        mask[held] = False
        m = scorer.new_model(1000 + k)
        scorer.train(images[mask], labels[mask], scorer.config.scorer.warmup_epochs, tad_seed(seed, 32, k), model=m)
        logits, _ = scorer.score(images[held], model=m)
        probs[held] = torch.softmax(logits, 1)
    return probs
