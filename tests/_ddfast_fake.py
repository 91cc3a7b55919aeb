"""A tiny, real-but-cheap distiller for the pipeline/CLI tests (registered as method ``fake``).

It does distribution matching in the style of DM (Zhao & Bilen, WACV 2023): synthetic images start as random
real images of their class and follow the gradient of ``|| mean_embed(real_c) - mean_embed(syn_c) ||^2``
under a freshly drawn random ConvNet each iteration. Every draw comes from ``self.generator`` so an
interrupted run resumes exactly. ``fail_at`` (or ``$DDFAST_FAKE_FAIL_AT``) raises KeyboardInterrupt at that iteration and
``$DDFAST_FAKE_STEP_SLEEP`` slows every step down (interrupt tests).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Dict

import torch

from ddfast.distill import METHODS
from ddfast.distill.base import DistillConfig, Distiller, SyntheticSet, TrainSet

PRESET_DOCS = {"quick": "fake DM, 8 iterations", "full": "fake DM, 40 iterations"}


@dataclass
class FakeConfig(DistillConfig):
    iterations: int = 8
    checkpoint_every: int = 3
    lr_img: float = 1.0
    batch_real: int = 16
    width: int = 8
    eval_epochs: int = 10
    eval_runs: int = 2
    fail_at: int = -1
    factor: int = 1  # multi-formation: the set decodes each stored image into factor^2 (as DANCE)


def preset_config(preset: str, dataset: str, ipc: int, **overrides: Any) -> FakeConfig:
    base = {"quick": {}, "full": {"iterations": 40}}[preset]
    base.update(overrides)
    return FakeConfig(ipc=ipc, **base)


class Fake(Distiller):
    name = "fake"
    config_class = FakeConfig

    def initialize(self, train: TrainSet) -> None:
        from ddfast.augment import Normalize

        self.norm = Normalize(train.mean, train.std)
        idx = []
        for ic in train.class_indices():
            perm = torch.randperm(ic.numel(), generator=self.generator)[: self.config.ipc]
            idx.append(ic[perm])
        idx = torch.cat(idx)
        self.images = self.norm.transform(train.images[idx].clone()).requires_grad_(True)
        self.labels = train.effective_labels()[idx].clone()
        self.opt = torch.optim.SGD([self.images], lr=self.config.lr_img, momentum=0.5)

    def step(self) -> Dict[str, float]:
        from ddfast.models import get_model

        fail_at = int(os.environ.get("DDFAST_FAKE_FAIL_AT", self.config.fail_at))
        if fail_at >= 0 and self.iteration >= fail_at:
            raise KeyboardInterrupt(f"injected interrupt at iteration {self.iteration}")
        if os.environ.get("DDFAST_FAKE_STEP_SLEEP"):
            time.sleep(float(os.environ["DDFAST_FAKE_STEP_SLEEP"]))
        train = self.train
        seed = int(torch.randint(2 ** 31, (1,), generator=self.generator))
        net = get_model("convnet", train.in_channels, train.num_classes, train.im_size, seed=seed,
                        width=self.config.width, depth=2)
        for p in net.parameters():
            p.requires_grad_(False)
        loss = 0.0
        for c, ic in enumerate(train.class_indices()):
            pick = ic[torch.randperm(ic.numel(), generator=self.generator)[: self.config.batch_real]]
            real = net.embed(self.norm.transform(train.images[pick])).mean(0)
            syn = net.embed(self.images[self.labels == c]).mean(0)
            loss = loss + ((real - syn) ** 2).sum()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return {"loss": float(loss.detach())}

    def synthetic_set(self) -> SyntheticSet:
        f = int(self.config.factor)
        images, labels = self.images.detach().clone(), self.labels.clone()
        if f > 1:
            from ddfast.distill.dance import decode

            order = torch.argsort(labels, stable=True)
            images, labels = images[order], labels[order]
            ipc = self.config.ipc
            images = torch.cat([decode(images[c * ipc:(c + 1) * ipc], f) for c in range(self.train.num_classes)])
            labels = labels.repeat_interleave(f * f)
        return SyntheticSet(images=images, labels=labels,
                            num_classes=self.train.num_classes, ipc=self.config.ipc, method="fake", lr=None,
                            preprocess={"mean": list(self.train.mean), "std": list(self.train.std), "zca": False},
                            eval_config={"model": "convnet", "model_kwargs": {"width": 8, "depth": 2},
                                         "epochs": self.config.eval_epochs, "num_runs": self.config.eval_runs,
                                         "lr": 0.01, "dsa": False, "batch_size": 64},
                            metadata={"iterations": self.iteration, "factor": f})

    def state_dict(self) -> Dict[str, Any]:
        return {"images": self.images.detach().clone(), "labels": self.labels.clone(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        with torch.no_grad():
            self.images.copy_(state["images"])
        self.labels = state["labels"].clone()
        self.opt.load_state_dict(state["opt"])


def register() -> None:
    """Makes ``--method fake`` available in this process."""
    METHODS["fake"] = (__name__, "Fake")
