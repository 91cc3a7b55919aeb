"""A pool of pretrained models with their initial and final parameters, as DANCE uses it.

DANCE (Zhang, Li, Lin, Wang, Qian, Ge; IJCAI 2024, §3.2; ``pretrain.py`` of
Hansong-Zhang/DANCE) trains ``pretrain_amount`` ConvNets from scratch and keeps two snapshots of each:
``theta_init`` (the random initialisation) and ``theta_final`` (after ``pretrain_epochs`` epochs). The
condensation loop interpolates between them ("middle encoders") and uses ``theta_final`` as the expert of the
distribution calibration. Here both snapshots of every model are held **in memory** as stacked flat
parameter vectors ``[K, P]`` (:func:`ddfast.models.flat_params` order) on the distillation device -- the
reference reloads both checkpoints from disk every iteration.

Training recipe (the reference's, ``pretrain.py`` + ``train.train_epoch``):

- SGD, lr 0.01, momentum 0.9, weight decay 5e-4, batch 64 (``batch_real`` of ``arg_pretrain.py``);
- MultiStepLR x0.2 at epochs ``2E//3`` and ``5E//6`` (stepped per epoch);
- every batch: normalise, then DiffAug ``color_crop`` with per-sample parameters (IDC's
  ``DiffAug(batch=False)``: colour and crop both applied; ``cutout`` is removed from the strategy because
  CutMix is on), then CutMix with probability 0.5 and ``Beta(1, 1)`` (:func:`ddfast.augment.cutmix`);
- one epoch = one pass over the (shuffled) training set in batches of 64, the last one partial.

The training set is whatever the caller passes: DANCE passes ``TrainSet.effective()`` -- the trusted samples
with TAD's replacement labels -- so TAD's diversion reaches the pool.

Caching and resume: with ``cache_dir``, every finished model is written at once (atomically, safetensors) to
``cache_dir/dance_pool/<digest>/model_<k>.safetensors``, where ``<digest>`` hashes the caller's key (dataset,
label/trust digest, image digest) and every recipe field except ``amount``. A build that was killed
continues with the first missing model; a larger ``amount`` reuses the models already there (model ``k``
depends only on the seed and ``k``). Corrupt files are retrained.

Several models at once with ``torch.func.vmap`` was measured on a 2-core CPU (benchmarks/RESULTS.md,
"DANCE: time and peak memory per iteration"): it was slower per model than training them one after the
other, so the pool trains models sequentially.
"""
from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..augment import DSA, Normalize, cutmix
from ..config import Config, option
from ..hashing import derive_seed, digest, tensor_digest
from ..io import atomic_write_json, load_tensors, save_tensors
from ..models import NetConfig, flat_params, load_flat, num_params
from ..noise import forward_corrected_cross_entropy

__all__ = ["PoolConfig", "ModelPool", "build_pool", "train_pool_model", "pool_digest", "seed_from"]

POOL_FORMAT = "ddfast.dance_pool/1"


def seed_from(*parts: int) -> int:
    """A deterministic 62-bit seed from integers (:func:`ddfast.hashing.derive_seed`)."""
    return derive_seed(*parts, sep="/", bits=62)


@dataclass(frozen=True)
class PoolConfig(Config):
    """Recipe of the pretrained pool (defaults: DANCE's ``--reproduce`` values for CIFAR/F-MNIST).

    Attributes:
        net: the pool architecture (:class:`ddfast.models.NetConfig`; ConvNet-3, width 128, instance norm in the
            reference). DANCE's middle encoders and calibration expert are pool models.
        amount: number of models trained (``pretrain_amount``; 20 in the reference).
        epochs: training epochs per model (``pretrain_epochs``; 60).
        lr, momentum, weight_decay, batch_size: SGD recipe (0.01, 0.9, 5e-4, 64).
        aug: DiffAug strategy applied with per-sample parameters, all groups (``"color_crop"``; ``""`` = none).
        cutmix_p, cutmix_beta: CutMix probability per batch and Beta parameter (0.5, 1.0).
        subset: train on this many samples drawn once (seeded) from the given set; 0 = all (quick presets).
        seed: pool seed; model ``k`` is initialised and trained from seeds derived from ``(seed, k)``.
    """

    net: NetConfig = option(factory=NetConfig)
    amount: int = option(20, ge=1)
    epochs: int = option(60, ge=1)
    lr: float = option(0.01, gt=0)
    momentum: float = option(0.9, ge=0)
    weight_decay: float = option(5e-4, ge=0)
    batch_size: int = option(64, ge=1)
    aug: str = option("color_crop")
    cutmix_p: float = option(0.5, ge=0, le=1)
    cutmix_beta: float = option(1.0, gt=0)
    subset: int = option(0, ge=0)
    seed: int = option(0)

    def check(self) -> None:
        if self.aug:
            try:
                DSA(self.aug, mode="M")
            except ValueError as exc:
                self.fail("aug", f"is not a DSA strategy: {exc}")

    def key_dict(self) -> Dict[str, Any]:
        """The fields a model's parameters depend on (everything but ``amount``)."""
        d = self.to_dict()
        d.pop("amount")
        return d


def pool_digest(key: Dict[str, Any]) -> str:
    """16 hex digits of SHA-256 over the canonical JSON of ``key`` (:func:`ddfast.hashing.digest`)."""
    return digest(key)


class ModelPool:
    """``K`` models' initial and final parameters, in memory.

    Attributes:
        template: the architecture (an ``nn.Module`` whose own parameters are not used; frozen).
        inits, finals: ``float32 [K, P]`` flat parameter vectors on the pool's device.
        info: per-model facts (``seconds``, ``train_acc`` of the last epoch in percent, ``loaded``).
        digest: the cache digest (or ``None`` when built without a key).
    """

    def __init__(self, template: nn.Module, inits: torch.Tensor, finals: torch.Tensor,
                 info: Optional[List[Dict[str, Any]]] = None, digest: Optional[str] = None):
        P = num_params(template)
        if inits.dim() != 2 or inits.shape != finals.shape or inits.shape[1] != P:
            raise ValueError(f"inits/finals must both be [K, {P}], got {tuple(inits.shape)} and {tuple(finals.shape)}")
        self.template = template
        for p in self.template.parameters():
            p.requires_grad_(False)
        self.inits = inits
        self.finals = finals
        self.info = list(info or [{} for _ in range(inits.shape[0])])
        self.digest = digest

    def __len__(self) -> int:
        return self.inits.shape[0]

    @property
    def num_params(self) -> int:
        return self.inits.shape[1]

    def middle(self, k: int, lam: float | torch.Tensor) -> torch.Tensor:
        """DANCE's middle encoder (Zhang et al., IJCAI 2024, eq. 3): ``lam * theta_init[k] + (1 - lam) * theta_final[k]``,
        ``float32 [P]``; ``lam = 0`` gives the final, ``lam = 1`` the initial parameters exactly."""
        if not 0 <= int(k) < len(self):
            raise ValueError(f"model index k must be in [0, {len(self)}), got {k}")
        lam_t = torch.as_tensor(lam, dtype=self.inits.dtype, device=self.inits.device)
        return lam_t * self.inits[k] + (1.0 - lam_t) * self.finals[k]

    def module(self, flat: torch.Tensor) -> nn.Module:
        """A frozen copy of the template carrying ``flat`` (eval mode)."""
        m = copy.deepcopy(self.template)
        load_flat(m, flat)
        for p in m.parameters():
            p.requires_grad_(False)
        return m.eval()

    def fingerprint(self) -> str:
        """SHA-256 (16 hex digits) of the stacked parameters: two pools with equal fingerprints are equal."""
        return tensor_digest(self.inits, self.finals)

    def to(self, device) -> "ModelPool":
        self.inits = self.inits.to(device)
        self.finals = self.finals.to(device)
        self.template = self.template.to(device)
        return self


def make_template(config: PoolConfig, in_channels: int, num_classes: int, im_size: Sequence[int],
                  seed: Optional[int] = None) -> nn.Module:
    """The pool architecture (``config.net.build(...)``)."""
    return config.net.build(in_channels, num_classes, tuple(im_size), seed=seed)


def train_pool_model(images: torch.Tensor, labels: torch.Tensor, num_classes: int, normalize: Normalize,
                     config: PoolConfig, index: int, device: torch.device | str = "cpu",
                     progress: Optional[Callable[[int], None]] = None,
                     transition: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, Any]]:
    """Trains pool model ``index`` from scratch with the reference recipe (module docstring).

    Args:
        images: ``float32 [n, C, H, W]`` in [0, 1] (raw pixels; ``normalize`` is applied per batch).
        labels: ``int64 [n]`` in ``[0, num_classes)``.
        normalize: the network-input normalisation.
        config: the recipe; ``index`` selects the seeds ``seed_from(config.seed, index, 0)`` (weights) and
            ``seed_from(config.seed, index, 1)`` (order, augmentation, CutMix).
        progress: optional ``progress(epoch)`` callback after every epoch.
        transition: optional ``[C, C]`` label-noise estimate ``P(label j | true class i)``: the model then
            minimises the forward-corrected cross-entropy (Patrini et al., CVPR 2017;
            :func:`ddfast.noise.forward_corrected_cross_entropy`), on both labels of a CutMix batch.

    Returns:
        ``(theta_init [P], theta_final [P], info)`` (CPU float32; ``info``: ``seconds``, ``train_acc``
        of the last epoch in percent, measured on the augmented batches against the unmixed labels).

    Raises:
        ValueError: empty or mismatched inputs.
    """
    if images.dim() != 4 or images.shape[0] == 0 or labels.shape != (images.shape[0],):
        raise ValueError(f"images [n, C, H, W] and labels [n] needed, got {tuple(images.shape)} and "
                         f"{tuple(labels.shape)}")
    t0 = time.perf_counter()
    dev = torch.device(device)
    model = make_template(config, images.shape[1], num_classes, images.shape[2:],
                          seed=seed_from(config.seed, index, 0)).to(dev)
    theta_init = flat_params(model).detach().cpu().clone()
    g = torch.Generator().manual_seed(seed_from(config.seed, index, 1))
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                          weight_decay=config.weight_decay)
    dsa = DSA(config.aug, mode="M") if config.aug else None
    X, Y = images.to(dev), labels.to(dev)
    n, bs = X.shape[0], min(config.batch_size, X.shape[0])
    steps = math.ceil(n / bs)
    E = config.epochs
    if transition is None:
        ce = F.cross_entropy
    else:
        T = transition.to(dev, torch.float32)
        ce = lambda logits, y: forward_corrected_cross_entropy(logits, y, T)  # noqa: E731
    correct = seen = 0
    model.train()
    for epoch in range(E):
        factor = (0.2 if epoch >= (2 * E) // 3 else 1.0) * (0.2 if epoch >= (5 * E) // 6 else 1.0)
        for pg in opt.param_groups:
            pg["lr"] = config.lr * factor
        perm = torch.randperm(n, generator=g).to(dev)
        correct = seen = 0
        for b in range(steps):
            idx = perm[b * bs:(b + 1) * bs]
            with torch.no_grad():
                xb = normalize(X[idx])
                if dsa is not None:
                    xb = dsa(xb, int(torch.randint(2 ** 62, (1,), generator=g)))
            yb = Y[idx]
            xb, yb2, ratio = cutmix(xb, yb, g, config.cutmix_beta, config.cutmix_p)
            out = model(xb)
            loss = ce(out, yb)
            if ratio < 1.0:
                loss = ratio * loss + (1.0 - ratio) * ce(out, yb2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            correct += int((out.detach().argmax(1) == yb).sum())
            seen += int(yb.numel())
        if progress is not None:
            progress(epoch + 1)
    if not torch.isfinite(flat_params(model)).all():
        raise FloatingPointError(f"pool model {index}: non-finite parameters after training")
    info = {"seconds": time.perf_counter() - t0, "train_acc": 100.0 * correct / max(seen, 1), "loaded": False}
    return theta_init, flat_params(model).detach().cpu().clone(), info


def _select_subset(n: int, config: PoolConfig) -> Optional[torch.Tensor]:
    if config.subset <= 0 or config.subset >= n:
        return None
    g = torch.Generator().manual_seed(seed_from(config.seed, -1, 2))
    return torch.randperm(n, generator=g)[:config.subset].sort().values


def build_pool(images: torch.Tensor, labels: torch.Tensor, num_classes: int, normalize: Normalize,
               config: PoolConfig, *, key: Optional[Dict[str, Any]] = None, cache_dir: Optional[str] = None,
               device: torch.device | str = "cpu", quiet: bool = True,
               trainer: Optional[Callable[..., Tuple[torch.Tensor, torch.Tensor, Dict[str, Any]]]] = None,
               transition: Optional[torch.Tensor] = None) -> ModelPool:
    """Builds (or loads from ``cache_dir``, or finishes building) the pool of ``config.amount`` models.

    Args:
        images, labels: the training set (``float32 [n, C, H, W]`` in [0, 1], ``int64 [n]``); DANCE passes
            ``TrainSet.effective()``.
        num_classes: C.
        normalize: network-input normalisation applied per batch.
        config: the recipe (validated).
        key: what the pool depends on besides the recipe (dataset, label/trust digest, image digest); the
            cache folder is ``pool_digest({"format", "key", "recipe"})``. Required with ``cache_dir``.
        cache_dir: cache root (``None``: nothing is read or written).
        device: where models are trained and where the pool's tensors live.
        trainer: replaces :func:`train_pool_model` (tests).
        transition: forward loss correction of every pool model (:func:`train_pool_model`); it must be part of
            ``key`` when a cache is used (DANCE's key holds it through :func:`ddfast.distill.base.labels_digest`).

    Returns:
        :class:`ModelPool` with ``inits``/``finals`` ``[amount, P]`` on ``device``.

    Raises:
        ValueError: bad config or inputs, ``cache_dir`` without ``key``.
    """
    from tqdm.auto import tqdm

    if cache_dir is not None and key is None:
        raise ValueError("key is required when cache_dir is given")
    trainer = trainer or train_pool_model
    dev = torch.device(device)
    sub = _select_subset(images.shape[0], config)
    if sub is not None:
        images, labels = images[sub], labels[sub]
    full_key = {"format": POOL_FORMAT, "key": key, "recipe": config.key_dict()}
    digest = pool_digest(full_key) if key is not None else None
    folder = None
    if cache_dir is not None:
        folder = os.path.join(cache_dir, "dance_pool", digest)
        os.makedirs(folder, exist_ok=True)
        desc_path = os.path.join(folder, "pool.json")
        if not os.path.exists(desc_path):
            atomic_write_json(full_key, desc_path)
    template = make_template(config, images.shape[1], num_classes, images.shape[2:], seed=0)
    P = num_params(template)
    inits, finals, info = [], [], []
    bar = tqdm(total=config.amount * config.epochs, desc="dance pool", disable=quiet, leave=False,
               dynamic_ncols=True)
    for k in range(config.amount):
        path = os.path.join(folder, f"model_{k:03d}.safetensors") if folder else None
        got = None
        if path and os.path.exists(path):
            try:
                tensors, meta = load_tensors(path)
                ok = (meta or {}).get("digest") == digest and meta.get("index") == k and \
                    tuple(tensors["init"].shape) == (P,) and tuple(tensors["final"].shape) == (P,)
                if ok:
                    got = (tensors["init"], tensors["final"], dict(meta.get("info", {}), loaded=True))
            except (ValueError, KeyError, OSError):
                got = None  # corrupt or foreign file: retrain it
        if got is None:
            base = bar.n
            extra = {} if transition is None else {"transition": transition}
            got = trainer(images, labels, num_classes, normalize, config, k, dev,
                          progress=lambda e, base=base: bar.update(base + e - bar.n), **extra)
            if path:
                save_tensors({"init": got[0].contiguous(), "final": got[1].contiguous()}, path,
                             meta={"format": POOL_FORMAT, "digest": digest, "index": k, "info": got[2]})
        else:
            bar.update(config.epochs)
        inits.append(got[0])
        finals.append(got[1])
        info.append(got[2])
    bar.close()
    return ModelPool(template.to(dev), torch.stack(inits).to(dev, torch.float32),
                     torch.stack(finals).to(dev, torch.float32), info, digest)
