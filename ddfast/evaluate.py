"""Evaluation harness: train fresh networks on a (distilled, subset or full) labelled set, test them.

``evaluate_synset(images, labels, test_set, *, config=None, transform=None, **overrides) -> EvalResult``
trains ``num_runs`` freshly initialised networks for ``epochs`` epochs and reports the test accuracy (percent)
mean and standard deviation (population std, ``ddof=0``, as the papers' code computes it with ``np.std``).

The recipes of the three methods are options of :class:`EvalConfig` (the official evaluation code: DATM's ``evaluate_synset``, DANCE's
``test.py``/``train.py``, RCIG's ``eval.py``):

- DATM/MTT: ``loss="soft_ce"`` (learned label logits, softmax at temperature 1), ``lr`` = the learned lr,
  SGD momentum 0.9, weight decay 5e-4, lr x0.1 at half of the epochs (``schedule="step"``), DSA on,
  batch 128 (DATM: 1000 epochs).
- DANCE: ``loss="ce"``, SGD lr 0.01, batch 64, ``schedule="multistep"`` (x0.2 at 2/3 and 5/6), DSA
  ``color_crop_flip_scale_rotate`` with ``dsa_mode="idc"`` and CutMix (``cutmix_p=0.5``, ``cutmix_beta=1``;
  :func:`ddfast.augment.cutmix`, loss ``ratio * l(y) + (1 - ratio) * l(y[perm])``).
- RCIG: ``loss="mse"`` on the learned labels (hard labels become centred one-hot ``e_y - 1/C``), Adam
  lr 1e-4, ``schedule="cosine"`` with ``warmup_steps=500``, ReLU ConvNet (``model="convnet_rcig"``).

Input transform: ``transform`` (an :mod:`ddfast.augment` transform such as ``Normalize``/``ZCA``/``Compose``)
is applied to the training images (unless ``images_transformed=True``: e.g. DATM's synthetic images already
live in ZCA space) *and always to the test images*, so that train and test see the same network-input space
(the trap of GitHub issue GeorgeCazenavette/mtt-distillation#11: a ZCA-trained network tested on un-whitened images). DSA acts on the
transformed images, as in MTT/DATM.

Runs: with ``vmap=True`` the K runs are trained together as one stacked parameter tensor ``[K, P]`` with
``torch.func.vmap`` (:func:`ddfast.models.batched_forward`); SGD/Adam are element-wise so every run follows
exactly its own trajectory (same seeds -> the same result as the loop up to float rounding). On the CPU the
loop was measured faster (2-core machine, 28x28 fused ConvNet width 32/128, K=5, one SGD step: vmap 1.33-4.97x slower
at 10 and 100 images per run and step -- vmapped convolutions become grouped convolutions;
``benchmarks/bench_baselines.py --vmap-check``, table in benchmarks/RESULTS.md), so
``vmap="auto"`` uses the loop on CPU. On CUDA, where small per-run batches are launch-bound
(several small networks in one vmapped call), ``"auto"`` picks vmap for K > 1, no batch norm and at most ``VMAP_AUTO_MAX_TRAIN``
training images -- a heuristic not yet timed on a GPU.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import distributed as dd
from .augment import DSA, cutmix
from .config import Config, option, set_path
from .models import batched_forward, flat_params, get_model, has_batchnorm, num_params

__all__ = [
    "EvalConfig",
    "EvalResult",
    "evaluate_synset",
    "train_classifier",
    "evaluate_model",
    "per_sample_loss",
    "lr_factor",
    "make_optimizer",
    "LOSSES",
    "VMAP_AUTO_MAX_TRAIN",
    "evaluate_sharded",
    "synset_eval_config",
    "evaluate_synthetic_set",
]

LOSSES = ("ce", "soft_ce", "mse", "gce")
_SCHEDULES = ("step", "multistep", "cosine", "constant")
#: vmap="auto" uses vmap only for training sets up to this many images (measured; see module docstring)
VMAP_AUTO_MAX_TRAIN = 2000


@dataclass
class EvalConfig(Config):
    """Options of the harness (every field is JSON-serialisable).

    Attributes:
        model: a :func:`ddfast.models.get_model` name; ``model_kwargs`` go to it (e.g. ``{"width": 64}``).
        lr: learning rate (a float; DATM's learned lr may be passed as a 0-d tensor).
        epochs: passes over the training set; ``batch_size`` images per step (last batch may be smaller).
        num_runs: K independently initialised networks (seeds ``seed + k``).
        loss: ``"ce"`` (hard labels), ``"soft_ce"`` (label logits ``[n, C]``), ``"mse"`` (RCIG), ``"gce"``
            (generalised cross entropy, Zhang & Sabuncu 2018, ``gce_q``); ``None``: ``"ce"`` for integer
            labels, ``"soft_ce"`` for float labels.
        optimizer: ``"sgd"`` (``momentum``) or ``"adam"``; ``weight_decay`` ``None`` -> 5e-4 for SGD, 0 for Adam.
        schedule: ``"step"`` (x0.1 from epoch ``epochs // 2``), ``"multistep"`` (x0.2 at 2/3, x0.04 at 5/6),
            ``"cosine"`` (linear warm-up over ``warmup_steps`` then cosine to 0, per step) or ``"constant"``.
        dsa: apply :class:`ddfast.augment.DSA` (``dsa_strategy``, mode ``dsa_mode``) to every training batch.
        dsa_mode: ``"S"`` (one group per batch, MTT/DATM), ``"M"`` (every group) or ``"idc"`` (IDC/DANCE's
            ``DiffAug(batch=False)``: the ``flip`` and ``color`` groups always, then one of the other groups
            except ``cutout`` per batch, then ``cutout`` if listed; per-sample parameters throughout).
        cutmix_p, cutmix_beta: CutMix probability per batch (0 = off) and Beta parameter, applied after DSA
            (IDC/DANCE; :func:`ddfast.augment.cutmix`).
        eval_batch_size: test-time batch size.
        num_classes: ``None`` -> from the test set / soft labels / largest label.
        seed: base seed (model init, data order, DSA draws).
        vmap: ``True``, ``False`` or ``"auto"`` (module docstring).
        device: ``"cpu"``, ``"cuda"``, ...
    """

    model: str = option("convnet")
    model_kwargs: Dict[str, Any] = option(factory=dict)
    lr: float = option(0.01, gt=0)
    epochs: int = option(300, ge=1)
    num_runs: int = option(5, ge=1)
    batch_size: int = option(256, ge=1)
    loss: Optional[str] = option(None, choices=(None,) + LOSSES)
    gce_q: float = option(0.7, gt=0, le=1)
    optimizer: str = option("sgd", choices=("sgd", "adam"))
    momentum: float = option(0.9, ge=0, lt=1)
    weight_decay: Optional[float] = option(None, ge=0)
    schedule: str = option("step", choices=_SCHEDULES)
    warmup_steps: int = option(0, ge=0)
    dsa: bool = option(True)
    dsa_strategy: str = option("color_crop_cutout_flip_scale_rotate")
    dsa_mode: str = option("S", choices=("S", "M", "idc"))
    cutmix_p: float = option(0.0, ge=0, le=1)
    cutmix_beta: float = option(1.0, gt=0)
    eval_batch_size: int = option(1024, ge=1)
    num_classes: Optional[int] = option(None, ge=2)
    seed: int = option(0)
    vmap: Union[bool, str] = option("auto", choices=(True, False, "auto"))
    device: str = option("cpu")


@dataclass
class EvalResult:
    """Test accuracy of K runs.

    Attributes:
        mean, std: accuracy in percent over the runs (population std).
        accs: per-run accuracies (percent).
        seconds: wall time of training + testing all runs.
        config: the resolved :class:`EvalConfig` as a dict plus the facts of the run (``n_train``,
            ``label_kind``, ``transform``, ``vmapped``, ...).
        per_class: test accuracy (percent) of each class (over that class's test images), averaged over the
            runs; None where the evaluation did not record it (e.g. a result cached by an older version).
    """

    mean: float
    std: float
    accs: List[float]
    seconds: float
    config: Dict[str, Any] = field(default_factory=dict)
    per_class: Optional[List[float]] = None

    def to_dict(self) -> Dict[str, Any]:
        d = {"mean": self.mean, "std": self.std, "accs": list(self.accs), "seconds": self.seconds,
             "config": self.config}
        if self.per_class is not None:
            d["per_class"] = [float(a) for a in self.per_class]
        return d

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), allow_nan=False, **kw)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "EvalResult":
        pc = d.get("per_class")
        return cls(float(d["mean"]), float(d["std"]), [float(a) for a in d["accs"]], float(d["seconds"]),
                   dict(d.get("config", {})), None if pc is None else [float(a) for a in pc])

    @classmethod
    def from_json(cls, s: str) -> "EvalResult":
        return cls.from_dict(json.loads(s))

    @classmethod
    def from_accs(cls, accs: Sequence[float], seconds: float, config: Dict[str, Any],
                  per_class: Optional[Sequence[Sequence[float]]] = None) -> "EvalResult":
        """From the per-run accuracies (and, optionally, each run's per-class accuracies ``[runs][C]``)."""
        t = torch.tensor([float(a) for a in accs], dtype=torch.float64)
        pc = None
        if per_class is not None and len(per_class) and all(p is not None for p in per_class):
            pc = torch.tensor([[float(a) for a in p] for p in per_class], dtype=torch.float64).mean(0).tolist()
        return cls(float(t.mean()), float(t.std(unbiased=False)) if len(accs) > 1 else 0.0,
                   [float(a) for a in accs], float(seconds), config, pc)

    def __str__(self) -> str:
        return f"{self.mean:.2f} +- {self.std:.2f} % ({len(self.accs)} runs, {self.seconds:.1f} s)"


# --------------------------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------------------------


def per_sample_loss(kind: str, logits: torch.Tensor, targets: torch.Tensor, gce_q: float = 0.7) -> torch.Tensor:
    """Per-sample loss ``[B]`` for ``logits [B, C]``.

    - ``ce``: ``-log softmax(z)_y`` (``targets`` int64 ``[B]``).
    - ``soft_ce``: ``-sum_k softmax(t)_k log softmax(z)_k`` with ``targets`` float logits ``[B, C]`` (DATM;
      integer targets are treated as one-hot).
    - ``mse``: ``0.5 * ||z - t||^2`` with ``t`` float ``[B, C]`` or, for integer targets, the centred one-hot
      ``e_y - 1/C`` (RCIG's label initialisation).
    - ``gce``: ``(1 - p_y^q) / q`` (Zhang & Sabuncu, NeurIPS 2018, eq. 6), integer targets.
    """
    C = logits.shape[-1]
    hard = not targets.is_floating_point()
    if kind == "ce":
        if not hard:
            raise ValueError("loss 'ce' needs integer labels; use 'soft_ce' or 'mse' for float labels")
        return F.cross_entropy(logits, targets, reduction="none")
    if kind == "soft_ce":
        if hard:
            return F.cross_entropy(logits, targets, reduction="none")
        return -(torch.softmax(targets, dim=-1) * torch.log_softmax(logits, dim=-1)).sum(-1)
    if kind == "mse":
        t = F.one_hot(targets, C).to(logits.dtype) - 1.0 / C if hard else targets.to(logits.dtype)
        return 0.5 * (logits - t).pow(2).sum(-1)
    if kind == "gce":
        if not hard:
            raise ValueError("loss 'gce' needs integer labels")
        p_y = torch.softmax(logits, dim=-1).gather(-1, targets.view(-1, 1)).squeeze(-1)
        return (1.0 - p_y.clamp_min(1e-12).pow(gce_q)) / gce_q
    raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")


def lr_factor(cfg: EvalConfig, epoch: int, step: int, total_steps: int) -> float:
    """The multiplier of ``cfg.lr`` at ``(epoch, step)`` of ``total_steps`` under ``cfg.schedule`` (``constant``;
    ``step``: 0.1 after half the epochs; ``multistep``: x0.2 at 2/3 and 5/6 of the epochs; ``cosine``: per step,
    after ``warmup_steps`` linear warm-up steps)."""
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        return 0.1 if epoch >= cfg.epochs // 2 else 1.0
    if cfg.schedule == "multistep":
        f = 1.0
        if epoch >= (2 * cfg.epochs) // 3:
            f *= 0.2
        if epoch >= (5 * cfg.epochs) // 6:
            f *= 0.2
        return f
    # cosine with linear warm-up, per step
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    rest = max(total_steps - cfg.warmup_steps, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - cfg.warmup_steps, rest) / rest))


def make_optimizer(cfg: EvalConfig, params) -> torch.optim.Optimizer:
    """``cfg``'s optimiser over ``params``: SGD (momentum, weight decay default 5e-4) or Adam (default 0)."""
    wd = cfg.weight_decay if cfg.weight_decay is not None else (5e-4 if cfg.optimizer == "sgd" else 0.0)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=wd)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=wd)


# --------------------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------------------


def _test_tensors(test_set) -> Tuple[torch.Tensor, torch.Tensor, Optional[int]]:
    if hasattr(test_set, "images") and hasattr(test_set, "labels"):
        return test_set.images, test_set.labels, getattr(test_set, "num_classes", None)
    if isinstance(test_set, (tuple, list)) and len(test_set) == 2:
        return test_set[0], test_set[1], None
    raise TypeError("test_set must be an ImageDataset or an (images, labels) pair")


def _check_train(images, labels, num_classes=None) -> Tuple[torch.Tensor, torch.Tensor, int]:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a float tensor [n, C, H, W], got {getattr(images, 'shape', type(images))}")
    if images.shape[0] == 0:
        raise ValueError("images: empty training set")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or inf")
    if not isinstance(labels, torch.Tensor):
        raise ValueError("labels must be a tensor: int64 [n] or float logits [n, C]")
    if labels.is_floating_point():
        if labels.dim() != 2 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"soft labels must be [n, C] with n={images.shape[0]}, got {tuple(labels.shape)}")
        if not torch.isfinite(labels).all():
            raise ValueError("labels contain NaN or inf")
        C = labels.shape[1]
        if num_classes is not None and num_classes != C:
            raise ValueError(f"labels have {C} classes, the test set {num_classes}")
    else:
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"hard labels must be [n] with n={images.shape[0]}, got {tuple(labels.shape)}")
        labels = labels.long()
        C = num_classes if num_classes is not None else int(labels.max()) + 1
        if int(labels.min()) < 0 or int(labels.max()) >= C:
            raise ValueError(f"labels must lie in [0, {C})")
    return images, labels, int(C)


def _resolve(config: Optional[EvalConfig], overrides: Dict[str, Any]) -> EvalConfig:
    cfg = config if config is not None else EvalConfig()
    if not isinstance(cfg, EvalConfig):
        raise TypeError(f"config must be an EvalConfig, got {type(cfg).__name__}")
    if isinstance(cfg.lr, torch.Tensor):
        cfg = dataclasses.replace(cfg, lr=float(cfg.lr.detach()))
    return cfg.replace(**overrides).validate()


def _transform_name(t) -> str:
    if t is None:
        return "none"
    return getattr(t, "kind", type(t).__name__)


# --------------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------------


def _seed_gen(*parts: int) -> torch.Generator:
    g = torch.Generator()
    h = 0
    for p in parts:
        h = (h * 1_000_003 + int(p) + 0x9E3779B9) % (2 ** 63 - 1)
    g.manual_seed(h)
    return g


class _IDCAug:
    """IDC/DANCE's ``DiffAug(strategy, batch=False)`` call: ``flip`` and ``color`` always, then one of the
    remaining groups (not ``cutout``) per call, then ``cutout``; per-sample parameters. ``(x, seed)``."""

    def __init__(self, strategy: str):
        groups = [g for g in strategy.lower().split("_") if g]
        first = "_".join(g for g in ("flip", "color") if g in groups)
        rest = "_".join(g for g in groups if g not in ("flip", "color", "cutout"))
        self.first = DSA(first, mode="M") if first else None
        self.single = DSA(rest, mode="S") if rest else None
        self.last = DSA("cutout", mode="M") if "cutout" in groups else None
        if self.first is None and self.single is None and self.last is None:
            raise ValueError(f"dsa_strategy {strategy!r} has no groups")

    def __call__(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        mask = (1 << 63) - 1
        for i, part in enumerate((self.first, self.single, self.last)):
            if part is not None:
                x = part(x, (int(seed) + 7919 * i) & mask)
        return x


def _make_dsa(cfg: EvalConfig):
    if not cfg.dsa:
        return None
    if cfg.dsa_mode == "idc":
        return _IDCAug(cfg.dsa_strategy)
    return DSA(cfg.dsa_strategy, mode=cfg.dsa_mode)


def _mixed_loss(loss_kind: str, logits: torch.Tensor, yb: torch.Tensor, mix, gce_q: float) -> torch.Tensor:
    """Per-sample loss, CutMix-weighted when ``mix = (y_b, ratio)`` is given."""
    ls = per_sample_loss(loss_kind, logits, yb, gce_q)
    if mix is not None and mix[1] < 1.0:
        ls = mix[1] * ls + (1.0 - mix[1]) * per_sample_loss(loss_kind, logits, mix[0], gce_q)
    return ls


def _new_model(cfg: EvalConfig, in_ch: int, C: int, im_size, run: int) -> nn.Module:
    return get_model(cfg.model, in_ch, C, im_size, seed=cfg.seed + run, **cfg.model_kwargs)


def _train_loop(model: nn.Module, X: torch.Tensor, Y: torch.Tensor, cfg: EvalConfig, loss_kind: str, run: int,
                weights: Optional[torch.Tensor], callback: Optional[Callable[[int, nn.Module], None]]) -> nn.Module:
    n = X.shape[0]
    bs = min(cfg.batch_size, n)
    steps_per_epoch = math.ceil(n / bs)
    total = steps_per_epoch * cfg.epochs
    opt = make_optimizer(cfg, model.parameters())
    dsa = _make_dsa(cfg)
    g = _seed_gen(cfg.seed, run, 1)
    model.train()
    if callback is not None:
        callback(0, model)
    step = 0
    for epoch in range(cfg.epochs):
        perm = torch.randperm(n, generator=g).to(X.device)
        for b in range(steps_per_epoch):
            idx = perm[b * bs:(b + 1) * bs]
            xb, yb = X[idx], Y[idx]
            if dsa is not None:
                xb = dsa(xb, int(torch.randint(2 ** 62, (1,), generator=g)))
            mix = None
            if cfg.cutmix_p > 0:
                xb, yb_b, ratio = cutmix(xb, yb, g, cfg.cutmix_beta, cfg.cutmix_p)
                mix = (yb_b, ratio)
            f = lr_factor(cfg, epoch, step, total)
            for pg in opt.param_groups:
                pg["lr"] = cfg.lr * f
            ls = _mixed_loss(loss_kind, model(xb), yb, mix, cfg.gce_q)
            loss = (ls * weights[idx]).mean() if weights is not None else ls.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        if callback is not None:
            callback(epoch + 1, model)
    model.eval()
    return model


def _train_vmapped(template: nn.Module, flats0: torch.Tensor, X: torch.Tensor, Y: torch.Tensor, cfg: EvalConfig,
                   loss_kind: str, weights: Optional[torch.Tensor]) -> torch.Tensor:
    K = flats0.shape[0]
    n = X.shape[0]
    bs = min(cfg.batch_size, n)
    steps_per_epoch = math.ceil(n / bs)
    total = steps_per_epoch * cfg.epochs
    flats = nn.Parameter(flats0.clone())
    opt = make_optimizer(cfg, [flats])
    dsas = [_make_dsa(cfg) for _ in range(K)] if cfg.dsa else None
    gens = [_seed_gen(cfg.seed, k, 1) for k in range(K)]
    template.train()
    step = 0
    for epoch in range(cfg.epochs):
        perms = [torch.randperm(n, generator=gens[k]).to(X.device) for k in range(K)]
        for b in range(steps_per_epoch):
            idxs = [p[b * bs:(b + 1) * bs] for p in perms]
            xs, ybs, ratios = [], [], []
            for k in range(K):
                xk = X[idxs[k]]
                if dsas is not None:
                    xk = dsas[k](xk, int(torch.randint(2 ** 62, (1,), generator=gens[k])))
                if cfg.cutmix_p > 0:
                    xk, yk_b, rk = cutmix(xk, Y[idxs[k]], gens[k], cfg.cutmix_beta, cfg.cutmix_p)
                    ybs.append(yk_b)
                    ratios.append(rk)
                xs.append(xk)
            xb = torch.stack(xs)
            yb = torch.stack([Y[i] for i in idxs])
            f = lr_factor(cfg, epoch, step, total)
            for pg in opt.param_groups:
                pg["lr"] = cfg.lr * f
            logits = batched_forward(template, flats, xb)  # [K, B, C]
            B = logits.shape[1]
            ls = per_sample_loss(loss_kind, logits.reshape(K * B, -1), yb.reshape(K * B, *yb.shape[2:]),
                                 cfg.gce_q).view(K, B)
            if ratios:
                yb_b = torch.stack(ybs)
                ls_b = per_sample_loss(loss_kind, logits.reshape(K * B, -1), yb_b.reshape(K * B, *yb_b.shape[2:]),
                                       cfg.gce_q).view(K, B)
                r = torch.tensor(ratios, dtype=ls.dtype, device=ls.device).view(K, 1)
                ls = r * ls + (1.0 - r) * ls_b
            if weights is not None:
                ls = ls * torch.stack([weights[i] for i in idxs])
            loss = ls.mean(1).sum()  # each run's gradient is that of its own mean loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    template.eval()
    return flats.detach()


def _class_accuracy(correct: torch.Tensor, Y: torch.Tensor, num_classes: int) -> List[float]:
    """Per-class accuracy (percent) from a boolean ``correct [n]`` and labels ``Y [n]``; NaN-free: a class
    without test images gets 0."""
    hit = torch.bincount(Y.cpu(), weights=correct.cpu().double(), minlength=num_classes)[:num_classes]
    tot = torch.bincount(Y.cpu(), minlength=num_classes)[:num_classes].double()
    return (100.0 * hit / tot.clamp_min(1)).tolist()


@torch.no_grad()
def _accuracy(model: nn.Module, X: torch.Tensor, Y: torch.Tensor, batch_size: int,
              per_class_into: Optional[List[List[float]]] = None, num_classes: Optional[int] = None) -> float:
    """Test accuracy (percent); with ``per_class_into``, appends the per-class accuracies of this model."""
    was = model.training
    model.eval()
    hits = []
    for i in range(0, X.shape[0], batch_size):
        hits.append(model(X[i:i + batch_size]).argmax(1) == Y[i:i + batch_size])
    model.train(was)
    correct = torch.cat(hits) if hits else torch.zeros(0, dtype=torch.bool)
    if per_class_into is not None:
        C = int(num_classes if num_classes is not None else (int(Y.max()) + 1 if Y.numel() else 1))
        per_class_into.append(_class_accuracy(correct, Y, C))
    return 100.0 * int(correct.sum()) / max(X.shape[0], 1)


@torch.no_grad()
def _accuracy_vmapped(template: nn.Module, flats: torch.Tensor, X: torch.Tensor, Y: torch.Tensor,
                      batch_size: int, per_class_into: Optional[List[List[float]]] = None,
                      num_classes: Optional[int] = None) -> List[float]:
    template.eval()
    hits = []
    for i in range(0, X.shape[0], batch_size):
        pred = batched_forward(template, flats, X[i:i + batch_size]).argmax(-1)  # [K, b]
        hits.append(pred == Y[i:i + batch_size].view(1, -1))
    correct = torch.cat(hits, 1) if hits else torch.zeros(flats.shape[0], 0, dtype=torch.bool)
    if per_class_into is not None:
        C = int(num_classes if num_classes is not None else (int(Y.max()) + 1 if Y.numel() else 1))
        per_class_into.extend(_class_accuracy(c, Y, C) for c in correct)
    return [100.0 * int(c) / max(X.shape[0], 1) for c in correct.sum(1).cpu()]


def evaluate_model(model: nn.Module, test_set, transform=None, batch_size: int = 1024,
                   device: Optional[str] = None, per_class_into: Optional[List[List[float]]] = None) -> float:
    """Test accuracy (percent) of a trained ``model`` on ``test_set`` (ImageDataset or ``(images, labels)``),
    after applying ``transform`` to the test images. The model is put in eval mode for the pass and
    restored afterwards. ``per_class_into``: a list to which the per-class accuracies (percent, ``[C]``, C from
    the test set) are appended. Raises ``ValueError`` for mismatched shapes."""
    Xt, Yt, C = _test_tensors(test_set)
    dev = torch.device(device) if device else next(model.parameters()).device
    Xt = Xt.to(dev)
    if transform is not None:
        Xt = transform(Xt)
    return _accuracy(model, Xt, Yt.to(dev).long(), batch_size, per_class_into, C)


def _prepare(images, labels, test_set, cfg: EvalConfig, transform, images_transformed: bool):
    Xt, Yt, C_test = _test_tensors(test_set)
    C_hint = cfg.num_classes if cfg.num_classes is not None else C_test
    if C_hint is None and not labels.is_floating_point():
        C_hint = int(max(int(labels.max()), int(torch.as_tensor(Yt).max()))) + 1
    X, Y, C = _check_train(images, labels, C_hint)
    if Xt.dim() != 4 or tuple(Xt.shape[1:]) != tuple(X.shape[1:]):
        raise ValueError(f"test images {tuple(Xt.shape[1:])} and train images {tuple(X.shape[1:])} differ in shape")
    dev = torch.device(cfg.device)
    X, Y = X.detach().to(dev, torch.float32), Y.detach().to(dev)
    Xt, Yt = Xt.detach().to(dev, torch.float32), torch.as_tensor(Yt).long().to(dev)
    if transform is not None:
        with torch.no_grad():
            if not images_transformed:
                X = transform(X)
            Xt = transform(Xt)
    loss_kind = cfg.loss or ("soft_ce" if Y.is_floating_point() else "ce")
    if loss_kind in ("ce", "gce") and Y.is_floating_point():
        raise ValueError(f"loss {loss_kind!r} needs integer labels, got float labels [n, C]")
    return X, Y, Xt, Yt, C, loss_kind


def train_classifier(images: torch.Tensor, labels: torch.Tensor, *, config: Optional[EvalConfig] = None,
                     model: Optional[nn.Module] = None, num_classes: Optional[int] = None, transform=None,
                     images_transformed: bool = False, weights: Optional[torch.Tensor] = None, run: int = 0,
                     callback: Optional[Callable[[int, nn.Module], None]] = None, **overrides) -> nn.Module:
    """Trains one network on ``(images, labels)`` with the recipe of ``config`` (``num_runs`` is ignored).

    Args:
        images: ``float [n, C, H, W]`` (in [0, 1] unless ``images_transformed``).
        labels: ``int64 [n]`` or float label logits / targets ``[n, num_classes]``.
        model: a model to train in place (default: ``get_model(config.model, ..., seed=config.seed + run)``).
        num_classes: default: soft labels' width, else ``config.num_classes``, else ``max(label) + 1``.
        transform: network-input transform applied to ``images`` first (not if ``images_transformed``);
            pass the same one to :func:`evaluate_model` at test time.
        weights: optional ``float [n]`` per-sample loss weights (the loss is ``mean(w_i * l_i)``).
        callback: ``callback(epoch, model)`` called before training (epoch 0) and after every epoch
            (e.g. to record an expert trajectory with :func:`ddfast.models.flat_params`).
        **overrides: :class:`EvalConfig` fields.

    Returns:
        The trained model in eval mode (on ``config.device``).

    Raises:
        ValueError / TypeError: bad inputs or config fields (named).
    """
    cfg = _resolve(config, overrides)
    X, Y, C = _check_train(images, labels, num_classes if num_classes is not None else cfg.num_classes)
    dev = torch.device(cfg.device)
    X, Y = X.detach().to(dev, torch.float32), Y.detach().to(dev)
    if transform is not None and not images_transformed:
        with torch.no_grad():
            X = transform(X)
    loss_kind = cfg.loss or ("soft_ce" if Y.is_floating_point() else "ce")
    w = None
    if weights is not None:
        w = torch.as_tensor(weights, dtype=torch.float32).to(dev)
        if w.shape != (X.shape[0],) or not torch.isfinite(w).all() or (w < 0).any():
            raise ValueError(f"weights must be finite, non-negative, of shape [{X.shape[0]}]")
    if model is None:
        model = _new_model(cfg, X.shape[1], C, tuple(X.shape[2:]), run)
    model = model.to(dev)
    return _train_loop(model, X, Y, cfg, loss_kind, run, w, callback)


def _use_vmap(cfg: EvalConfig, template: nn.Module, n_train: int) -> bool:
    if cfg.vmap is True:
        if has_batchnorm(template):
            raise ValueError("vmap=True is not supported for batch-norm models (running statistics per run); "
                             "use vmap=False")
        return True
    if cfg.vmap is False:
        return False
    on_cuda = next(template.parameters()).device.type == "cuda"
    return on_cuda and cfg.num_runs > 1 and not has_batchnorm(template) and n_train <= VMAP_AUTO_MAX_TRAIN


def evaluate_synset(images: torch.Tensor, labels: torch.Tensor, test_set, *, config: Optional[EvalConfig] = None,
                    transform=None, images_transformed: bool = False, weights: Optional[torch.Tensor] = None,
                    log: Optional[Callable[[str], None]] = None, **overrides) -> EvalResult:
    """Trains ``num_runs`` fresh networks on ``(images, labels)`` and tests them.

    Args:
        images: ``float [n, C, H, W]``; in [0, 1] (then ``transform`` is applied) or already in network-input
            space (``images_transformed=True``, e.g. DATM/RCIG images stored in ZCA space).
        labels: ``int64 [n]`` hard labels, or ``float [n, C]`` label logits (``soft_ce``) / targets (``mse``).
        test_set: :class:`ddfast.data.ImageDataset` or ``(images float [m, C, H, W] in [0, 1], labels int [m])``.
        config: :class:`EvalConfig`; ``**overrides`` replace its fields (e.g. ``lr=syn.lr, epochs=1000``).
        transform: network-input transform (``Normalize``/``ZCA``/``Compose``), always applied to the test
            images, and to ``images`` unless ``images_transformed``.
        weights: optional per-sample loss weights ``float [n]``.
        log: optional ``log(str)`` called once per run.

    Returns:
        :class:`EvalResult` (accuracy percent, mean/std over runs, wall seconds, resolved config).

    Raises:
        ValueError: bad shapes/dtypes/labels, NaNs, bad config values (named); TypeError: unknown fields.
    """
    t0 = time.perf_counter()
    cfg = _resolve(config, overrides)
    X, Y, Xt, Yt, C, loss_kind = _prepare(images, labels, test_set, cfg, transform, images_transformed)
    w = None
    if weights is not None:
        w = torch.as_tensor(weights, dtype=torch.float32).to(X.device)
        if w.shape != (X.shape[0],) or not torch.isfinite(w).all() or (w < 0).any():
            raise ValueError(f"weights must be finite, non-negative, of shape [{X.shape[0]}]")
    im_size = tuple(X.shape[2:])
    template = _new_model(cfg, X.shape[1], C, im_size, 0).to(X.device)
    vm = _use_vmap(cfg, template, X.shape[0])
    accs: List[float] = []
    per_class: List[List[float]] = []
    if vm:
        flats0 = torch.stack([flat_params(_new_model(cfg, X.shape[1], C, im_size, k)).detach()
                              for k in range(cfg.num_runs)]).to(X.device)
        flats = _train_vmapped(template, flats0, X, Y, cfg, loss_kind, w)
        accs = _accuracy_vmapped(template, flats, Xt, Yt, cfg.eval_batch_size, per_class, C)
        if log:
            for k, a in enumerate(accs):
                log(f"run {k}: {a:.2f}%")
    else:
        for k in range(cfg.num_runs):
            model = _new_model(cfg, X.shape[1], C, im_size, k).to(X.device)
            _train_loop(model, X, Y, cfg, loss_kind, k, w, None)
            accs.append(_accuracy(model, Xt, Yt, cfg.eval_batch_size, per_class, C))
            if log:
                log(f"run {k}: {accs[-1]:.2f}% ({time.perf_counter() - t0:.1f} s)")
    info = cfg.to_dict()
    info.update({"loss_resolved": loss_kind, "n_train": int(X.shape[0]), "n_test": int(Xt.shape[0]),
                 "num_classes": C, "label_kind": "soft" if Y.is_floating_point() else "hard",
                 "transform": _transform_name(transform), "images_transformed": bool(images_transformed),
                 "vmapped": bool(vm), "num_params": num_params(template)})
    return EvalResult.from_accs(accs, time.perf_counter() - t0, info, per_class)


# --------------------------------------------------------------------------------------------------------
# synthetic sets and sharded runs
# --------------------------------------------------------------------------------------------------------


def synset_eval_config(syn, device="cpu", runs: Optional[int] = None, seed: int = 0,
                       overrides: Optional[Dict[str, Any]] = None) -> EvalConfig:
    """The :class:`EvalConfig` of a synthetic set's own protocol (``syn.eval_config``; the learned lr when the
    protocol does not fix one; ``num_classes`` of the set), with ``runs`` runs, base ``seed`` and
    ``overrides`` (EvalConfig fields) applied.

    Raises:
        UnknownOptionError: an override that is not an EvalConfig field. ValueError: a bad value (named).
    """
    names = set(EvalConfig.field_names())
    ec = {k: v for k, v in dict(syn.eval_config or {}).items() if k in names}
    if "lr" not in ec and syn.lr is not None:
        ec["lr"] = float(syn.lr)
    ec["device"] = str(device)
    ec.setdefault("num_classes", int(syn.num_classes))
    ec.setdefault("seed", int(seed))
    if runs is not None:
        ec["num_runs"] = int(runs)
    for k, v in dict(overrides or {}).items():
        set_path(ec, k, v, EvalConfig)
    return EvalConfig.from_dict(ec, path="eval")


def evaluate_synthetic_set(syn, test_set, *, runs: Optional[int] = None, seed: int = 0, device="cpu",
                           log: Optional[Callable[[str], None]] = None, **overrides) -> EvalResult:
    """Evaluates a :class:`~ddfast.distill.base.SyntheticSet` with its own protocol on ``test_set``
    (ImageDataset or ``(images in [0, 1], labels)``): the synthetic images are used as stored (network-input
    space) and the test images go through ``syn.input_transform()``. ``overrides`` replace EvalConfig fields
    (e.g. ``epochs=300``). Runs are sharded over the ranks under ``torchrun`` (:func:`evaluate_sharded`)."""
    cfg = synset_eval_config(syn, device, runs, seed, overrides)
    return evaluate_sharded(syn.images, syn.labels, test_set, config=cfg, transform=syn.input_transform(),
                            images_transformed=True, log=log)


def evaluate_sharded(images: torch.Tensor, labels: torch.Tensor, test_set, *, config=None, transform=None,
                     images_transformed: bool = False, weights: Optional[torch.Tensor] = None,
                     log: Optional[Callable[[str], None]] = None,
                     epoch_callback: Optional[Callable[[int, int], None]] = None, **overrides):
    """:func:`ddfast.evaluate.evaluate_synset` with its ``num_runs`` training runs spread over the ranks.

    Run ``k`` trains exactly as run ``k`` of the single-process loop (model seed ``seed + k``, data order and
    DSA draws from ``(seed, k)``), so the per-run accuracies are those of ``evaluate_synset(...,
    vmap=False)``; they are gathered in run order on every rank. Not distributed and without
    ``epoch_callback``: this *is* ``evaluate_synset`` (which may vmap the runs; equal up to float rounding).

    Args:
        epoch_callback: ``epoch_callback(run, epoch)`` after every training epoch of every run on this rank
            (progress bars); forces the per-run loop.

    Returns:
        :class:`ddfast.evaluate.EvalResult` (``seconds`` = wall time of the slowest rank).
    """
    if not dd.is_distributed() and epoch_callback is None:
        return evaluate_synset(images, labels, test_set, config=config, transform=transform,
                               images_transformed=images_transformed, weights=weights, log=log, **overrides)
    t0 = time.perf_counter()
    cfg = (config if config is not None else EvalConfig()).replace(**overrides).validate()
    num_classes = cfg.num_classes
    if num_classes is None:
        num_classes = getattr(test_set, "num_classes", None)
    mine: Dict[int, float] = {}
    for k in dd.shard_indices(cfg.num_runs):
        cb = None
        if epoch_callback is not None:
            cb = (lambda run: (lambda epoch, model: epoch_callback(run, epoch) if epoch > 0 else None))(k)
        model = train_classifier(images, labels, config=cfg, num_classes=num_classes, transform=transform,
                                 images_transformed=images_transformed, weights=weights, run=k, callback=cb)
        pc: List[List[float]] = []
        acc = float(evaluate_model(model, test_set, transform=transform, batch_size=cfg.eval_batch_size,
                                   device=cfg.device, per_class_into=pc))
        mine[k] = (acc, pc[0])
        if log:
            log(f"rank {dd.rank()} run {k}: {acc:.2f}%")
    got = dd.gather_by_index(cfg.num_runs, mine)
    accs = [g[0] for g in got]
    seconds = max(dd.all_gather_object(time.perf_counter() - t0))
    info = cfg.to_dict()
    info.update({"n_train": int(images.shape[0]), "label_kind": "soft" if labels.is_floating_point() else "hard",
                 "images_transformed": bool(images_transformed), "vmapped": False,
                 "sharded_over_ranks": dd.world_size(), "loss_resolved": cfg.loss or (
                     "soft_ce" if labels.is_floating_point() else "ce"),
                 "transform": getattr(transform, "kind", "none") if transform is not None else "none"})
    return EvalResult.from_accs(accs, seconds, info, [g[1] for g in got])
