"""Expert trajectory buffers for trajectory matching (MTT / FTD / DATM).

An *expert* is a network trained on the real training set; its *trajectory* is the list of its flat parameter
vectors (:func:`ddfast.models.flat_params` order) at the start and after every epoch: ``E + 1`` snapshots of
``P`` floats. DATM (Guo et al., ICLR 2024) samples a start epoch ``t`` and matches the student's end point to
snapshot ``t + M`` (Guo et al., ICLR 2024, §3; MTT, Cazenavette et al., CVPR 2022, eq. 2). This module builds such buffers and reads them back.

Recipes (DATM's ``buffer/buffer_FTD.py`` and MTT's ``buffer.py``):

- ``optimizer="gsam"`` -- FTD/DATM's ``buffer_FTD.py``: SGD (lr 0.01, momentum 0, weight decay 0, constant
  lr) wrapped in GSAM (Zhuang et al., ICLR 2022, "Surrogate Gap Guided Sharpness-Aware Minimization",
  Algorithm 1) with ``rho = 0.01``, ``alpha = 0.3`` and the adaptive (ASAM-style) perturbation. One GSAM step
  on a mini-batch with gradient ``g0 = grad L(w)`` is::

      adaptive:  e = rho * g0 * w**2 / (|| |w| * g0 || + eps)      plain: e = rho * g0 / (||g0|| + eps)
      g1 = grad L(w + e)                                   (same augmented mini-batch)
      cos = <g0, g1> / (||g0|| ||g1|| + eps)
      g_perp = g0 - cos * ||g0|| * g1 / (||g1|| + eps)    (component of g0 orthogonal to g1)
      d = g1 - alpha * g_perp,   then the base SGD step  w <- w - lr * (d + wd * w)  (with momentum if set)

  (``eps = 1e-12``; the norms are over the whole parameter vector of one expert.)
- ``optimizer="sgd"`` -- MTT's ``buffer.py``: the plain SGD step with ``d = g0`` (half the cost per step).

Both use cross entropy (mean over the batch) on DSA-augmented batches (one DSA draw per batch, mode 'S'),
batch 256, reshuffled every epoch, last batch kept (a smaller one), on images already in network-input space
(ZCA whitened for DATM).

Randomness and resume. Expert ``k`` takes its initial weights from the integer seed
``_mix(seed, k, 0)`` (:func:`ddfast.models.get_model`) and, in epoch ``e``, its shuffling and DSA draws from a
``torch.Generator`` seeded with ``_mix(seed, k, e + 1)``; its subset (``subset_per_class``) from
``_mix(seed, k, -1)``. Nothing depends on which other experts train beside it, so

- training several experts at once with ``torch.func.vmap`` (``vmap=True``: one stacked ``[K, P]`` parameter
  tensor, :func:`ddfast.models.batched_forward`) and one after another (``vmap=False``) draw identical batches and
  augmentations and give the same trajectories up to float rounding (tested);
- a build interrupted at any point continues with the next epoch of the unfinished experts: every epoch's
  snapshot is written at once (``expert_{k:04d}/epoch_{e:04d}.safetensors``, atomically, with the SGD momentum
  buffer when momentum > 0), and a finished expert is consolidated into ``expert_{k:04d}.safetensors``
  (tensor ``trajectory`` ``float32 [E + 1, P]``). A resumed build equals an uninterrupted one bitwise on the
  same machine and thread count (tested).

Under ``torchrun`` (:mod:`ddfast.distributed`) the experts are sharded over the ranks: rank ``r`` of ``W`` trains
experts ``r, r + W, ...`` (:func:`ddfast.distributed.shard_indices`) with the same per-expert seeds, so the buffer
is the single-process one. With a ``directory`` every rank writes only its own experts' files (the directory must
be on a file system all ranks see, e.g. ``$DDFAST_CACHE`` shared between nodes); rank 0 alone writes
``manifest.json`` (with every rank's statistics, gathered), and every rank then reads the whole buffer. Without
a directory the trajectories are gathered in memory (:func:`ddfast.distributed.all_gather_object`).

``manifest.json`` in the buffer directory records the recipe, the cache key, ``P`` and per-expert training
accuracy / loss per epoch (on the augmented training batches).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import distributed as dd
from ..augment import DSA
from ..config import Config, option
from ..hashing import derive_seed, digest
from ..io import atomic_write_json, load_safetensors, save_safetensors
from ..models import NetConfig, batched_forward, flat_params, functional_forward, has_batchnorm
from ..noise import forward_corrected_cross_entropy

__all__ = ["ExpertRecipe", "ExpertBuffer", "train_experts", "gsam_direction", "seed_mix", "buffer_directory"]

_EPS = 1e-12
_FORMAT = "ddfast.ExpertBuffer/1"


def seed_mix(*parts: int) -> int:
    """A 63-bit integer seed derived from integers (:func:`ddfast.hashing.derive_seed`); used for the
    per-expert, per-epoch generators so that every draw is a pure function of ``(seed, expert, epoch)``."""
    return derive_seed(*parts, sep=",", bits=63)


def _gen(*parts: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed_mix(*parts))
    return g


@dataclass
class ExpertRecipe(Config):
    """How the experts are trained (every field JSON-serialisable; :class:`ddfast.config.Config`).

    Attributes:
        net: the network (:class:`ddfast.models.NetConfig`; DATM/MTT: ConvNet-3, width 128, instance norm). In
            DATM the student has the experts' architecture, so this is also the distillation network.
        num_experts: N experts; epochs: E epochs each (E + 1 snapshots; DATM's ``train_epochs``).
        lr: SGD learning rate (``lr_teacher``, 0.01); momentum, weight_decay: SGD's (0, 0 in MTT/FTD/DATM).
        batch_size: mini-batch (256, ``batch_train``).
        optimizer: ``"gsam"`` (FTD/DATM) or ``"sgd"`` (MTT).
        gsam_rho, gsam_alpha, gsam_adaptive: GSAM's rho (0.01), alpha (0.3) and adaptive perturbation (True).
        subset_per_class: train each expert on at most this many samples per class (drawn per expert);
            0 = all samples (the papers' setting; the quick presets use a subset to fit a CPU budget).
        seed: base integer seed (module docstring).
        parallel: experts trained at once (0 = all N). Does not change the result (beyond float rounding with
            ``vmap``), so it is not part of the cache key.
        vmap: ``True`` (one vmapped ``[K, P]`` update for ``parallel`` experts), ``False`` (a loop) or
            ``"auto"`` (vmap on CUDA when ``parallel > 1`` and the model has no batch norm; the loop on CPU,
            where it was measured faster).

    The DSA augmentation of the training batches is an argument of :func:`train_experts` (DATM uses one DSA
    setting for experts, distillation and evaluation).
    """

    net: NetConfig = option(factory=NetConfig)
    num_experts: int = option(100, ge=1)
    epochs: int = option(50, ge=1)
    lr: float = option(0.01, gt=0)
    momentum: float = option(0.0, ge=0, lt=1)
    weight_decay: float = option(0.0, ge=0)
    batch_size: int = option(256, ge=1)
    optimizer: str = option("gsam", choices=("gsam", "sgd"))
    gsam_rho: float = option(0.01, ge=0)
    gsam_alpha: float = option(0.3, ge=0)
    gsam_adaptive: bool = option(True)
    subset_per_class: int = option(0, ge=0)
    seed: int = option(0)
    parallel: int = option(0, ge=0)
    vmap: Union[bool, str] = option("auto", choices=(True, False, "auto"))

    def key(self) -> Dict[str, Any]:
        """The fields that determine the trajectories (everything but ``parallel`` and ``vmap``)."""
        d = self.to_dict()
        d.pop("parallel")
        d.pop("vmap")
        return d


# --------------------------------------------------------------------------------------------------------
# the buffer
# --------------------------------------------------------------------------------------------------------


class ExpertBuffer:
    """N expert trajectories of ``E + 1`` flat snapshots each.

    Held in memory (``trajectories float32 [N, E + 1, P]``) or, for large buffers, read from the consolidated
    safetensors files on demand (one row per request through ``safetensors.safe_open``; nothing else is kept).

    Args:
        trajectories: ``float32 [N, E + 1, P]`` (in-memory buffer), or None with ``files``.
        files: per-expert ``expert_{k:04d}.safetensors`` paths (on-disk buffer).
        num_epochs, num_params: E and P (needed with ``files``).
        meta: free-form facts (recipe, key, accuracies).
    """

    def __init__(self, trajectories: Optional[torch.Tensor] = None, files: Optional[List[str]] = None,
                 num_epochs: Optional[int] = None, num_params: Optional[int] = None,
                 meta: Optional[Dict[str, Any]] = None):
        if (trajectories is None) == (files is None):
            raise ValueError("give exactly one of trajectories and files")
        self.meta = dict(meta or {})
        self._traj = trajectories
        self._files = files
        if trajectories is not None:
            if trajectories.dim() != 3:
                raise ValueError(f"trajectories must be [N, E+1, P], got {tuple(trajectories.shape)}")
            self.num_experts, snaps, self.num_params = trajectories.shape
            self.num_epochs = snaps - 1
        else:
            self.num_experts = len(files)
            self.num_epochs = int(num_epochs)
            self.num_params = int(num_params)

    @property
    def in_memory(self) -> bool:
        return self._traj is not None

    def _check(self, k: int, epoch: int) -> int:
        if not 0 <= int(k) < self.num_experts:
            raise ValueError(f"expert index {k} out of range [0, {self.num_experts})")
        e = int(epoch)
        if e < 0:
            e += self.num_epochs + 1
        if not 0 <= e <= self.num_epochs:
            raise ValueError(f"epoch {epoch} out of range for {self.num_epochs} epochs")
        return e

    def snapshot(self, k: int, epoch: int) -> torch.Tensor:
        """``float32 [P]``: expert ``k``'s parameters after ``epoch`` epochs (0 = initialisation; negative
        values count from the end, -1 = last)."""
        e = self._check(k, epoch)
        if self._traj is not None:
            return self._traj[int(k), e]
        from safetensors import safe_open

        with safe_open(self._files[int(k)], framework="pt", device="cpu") as f:
            return f.get_slice("trajectory")[e:e + 1].reshape(-1).clone()

    def snapshots(self, epoch: int) -> torch.Tensor:
        """``float32 [N, P]``: every expert at ``epoch``."""
        return torch.stack([self.snapshot(k, epoch) for k in range(self.num_experts)])

    def trajectory(self, k: int) -> torch.Tensor:
        """``float32 [E + 1, P]``: expert ``k``'s whole trajectory."""
        self._check(k, 0)
        if self._traj is not None:
            return self._traj[int(k)]
        return load_safetensors(self._files[int(k)])["trajectory"]

    def nbytes(self) -> int:
        return self.num_experts * (self.num_epochs + 1) * self.num_params * 4

    def __repr__(self) -> str:
        where = "memory" if self.in_memory else "disk"
        return (f"ExpertBuffer(experts={self.num_experts}, epochs={self.num_epochs}, P={self.num_params}, "
                f"in {where})")


def buffer_directory(cache_dir: str, key: Dict[str, Any]) -> str:
    """``cache_dir/datm_experts/<16 hex digits of the key's SHA-256>``."""
    return os.path.join(cache_dir, "datm_experts", digest(key))


# --------------------------------------------------------------------------------------------------------
# GSAM / SGD, row-wise over K experts
# --------------------------------------------------------------------------------------------------------


def gsam_direction(grad_fn: Callable[[torch.Tensor], torch.Tensor], w: torch.Tensor, g0: torch.Tensor,
                   rho: float, alpha: float, adaptive: bool = True, eps: float = _EPS) -> torch.Tensor:
    """GSAM's update direction for each row of ``w`` (Zhuang et al., ICLR 2022, Alg. 1; see module docstring).

    Args:
        grad_fn: ``w' [K, P] -> gradients [K, P]`` of each row's mini-batch loss (same batch as ``g0``).
        w: ``float [K, P]`` parameters; g0: ``[K, P]`` their gradients.
        rho, alpha: perturbation radius and surrogate-gap weight; adaptive: ASAM-style ``|w|`` scaling.

    Returns:
        ``[K, P]`` direction ``g1 - alpha * g_perp`` (before weight decay / momentum).
    """
    if adaptive:
        norm = (w.abs() * g0).norm(dim=1, keepdim=True)
        e = g0 * (rho / (norm + eps)) * w.square()
    else:
        e = g0 * (rho / (g0.norm(dim=1, keepdim=True) + eps))
    g1 = grad_fn(w + e)
    n0 = g0.norm(dim=1, keepdim=True)
    n1 = g1.norm(dim=1, keepdim=True)
    cos = (g0 * g1).sum(1, keepdim=True) / (n0 * n1 + eps)
    g_perp = g0 - cos * n0 * g1 / (n1 + eps)
    return g1 - alpha * g_perp


# --------------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------------


def _subset(labels: torch.Tensor, num_classes: int, per_class: int, g: torch.Generator) -> torch.Tensor:
    if per_class <= 0:
        return torch.arange(labels.shape[0])
    parts = []
    for c in range(num_classes):
        idx = torch.nonzero(labels == c, as_tuple=False).flatten()
        perm = torch.randperm(idx.numel(), generator=g)
        parts.append(idx[perm[:per_class]])
    return torch.sort(torch.cat(parts)).values


class _Trainer:
    """Trains a group of experts epoch by epoch (vmapped or in a loop) with the recipe's optimiser."""

    def __init__(self, recipe: ExpertRecipe, template: nn.Module, X: torch.Tensor, Y: torch.Tensor,
                 num_classes: int, device: torch.device, dsa_strategy: Optional[str],
                 transition: Optional[torch.Tensor] = None):
        self.r = recipe
        self.T = None if transition is None else transition.to(device, torch.float32)
        self.template = template
        self.X, self.Y = X, Y
        self.C = num_classes
        self.device = device
        self.dsa = DSA(dsa_strategy) if dsa_strategy else None
        self.subsets: Dict[int, torch.Tensor] = {}

    def subset(self, k: int) -> torch.Tensor:
        if k not in self.subsets:
            self.subsets[k] = _subset(self.Y.cpu(), self.C, self.r.subset_per_class, _gen(self.r.seed, k, -1))
        return self.subsets[k]

    def init_params(self, k: int) -> torch.Tensor:
        m = self.r.net.build(self.X.shape[1], self.C, tuple(self.X.shape[2:]), seed=seed_mix(self.r.seed, k, 0))
        return flat_params(m).detach().to(self.device, torch.float32)

    def _loss(self, logits: torch.Tensor, y: torch.Tensor, reduction: str) -> torch.Tensor:
        if self.T is None:
            return F.cross_entropy(logits, y, reduction=reduction)
        return forward_corrected_cross_entropy(logits, y, self.T, reduction=reduction)

    def _grads(self, W: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor, vm: bool):
        """Per-row gradients of each row's mean CE on its own batch; also losses and #correct."""
        K = W.shape[0]
        with torch.enable_grad():
            if vm:
                Wg = W.detach().requires_grad_(True)
                logits = batched_forward(self.template, Wg, xb)  # [K, B, C]
                B = logits.shape[1]
                ce = self._loss(logits.reshape(K * B, -1), yb.reshape(-1), "none").view(K, B).mean(1)
                (g,) = torch.autograd.grad(ce.sum(), Wg)
                correct = (logits.argmax(-1) == yb).sum(1)
                return g.detach(), ce.detach(), correct
            gs, ces, cors = [], [], []
            for k in range(K):
                wk = W[k].detach().requires_grad_(True)
                logits = functional_forward(self.template, wk, xb[k], track_bn_stats=False)
                ce = self._loss(logits, yb[k], "mean")
                (g,) = torch.autograd.grad(ce, wk)
                gs.append(g)
                ces.append(ce.detach())
                cors.append((logits.argmax(-1) == yb[k]).sum())
            return torch.stack(gs), torch.stack(ces), torch.stack(cors)

    def epoch(self, ks: Sequence[int], e: int, W: torch.Tensor, M: Optional[torch.Tensor], vm: bool):
        """Runs epoch ``e`` (0-based) for experts ``ks`` starting from ``W [K, P]`` (momentum buffers ``M``)."""
        r = self.r
        gens = [_gen(r.seed, k, e + 1) for k in ks]
        subs = [self.subset(k) for k in ks]
        n = subs[0].numel()
        perms = [subs[i][torch.randperm(n, generator=gens[i])] for i in range(len(ks))]
        bs = min(r.batch_size, n)
        loss_sum = torch.zeros(len(ks), dtype=torch.float64)
        correct = torch.zeros(len(ks), dtype=torch.long)
        for b in range(math.ceil(n / bs)):
            xs, ys = [], []
            for i in range(len(ks)):
                idx = perms[i][b * bs:(b + 1) * bs].to(self.X.device)
                x = self.X[idx]
                if self.dsa is not None:
                    x = self.dsa(x, int(torch.randint(1 << 62, (1,), generator=gens[i])))
                xs.append(x)
                ys.append(self.Y[idx])
            xb, yb = torch.stack(xs), torch.stack(ys)
            g0, ce, cor = self._grads(W, xb, yb, vm)
            loss_sum += ce.double().cpu() * yb.shape[1]
            correct += cor.cpu()
            if r.optimizer == "gsam":
                d = gsam_direction(lambda Wp: self._grads(Wp, xb, yb, vm)[0], W, g0, r.gsam_rho, r.gsam_alpha,
                                   r.gsam_adaptive)
            else:
                d = g0
            if r.weight_decay:
                d = d + r.weight_decay * W
            if r.momentum:
                M = d.clone() if M is None else M.mul_(r.momentum).add_(d)
                d = M
            W = W - r.lr * d
        return W, M, (loss_sum / n).tolist(), (100.0 * correct.double() / n).tolist()


def _epoch_path(directory: str, k: int, e: int) -> str:
    return os.path.join(directory, f"expert_{k:04d}", f"epoch_{e:04d}.safetensors")


def _final_path(directory: str, k: int) -> str:
    return os.path.join(directory, f"expert_{k:04d}.safetensors")


def _progress(directory: Optional[str], k: int, epochs: int) -> int:
    """Number of completed epochs of expert k on disk (E+1 means consolidated), -1 if nothing."""
    if directory is None:
        return -1
    if os.path.exists(_final_path(directory, k)):
        return epochs + 1
    done = -1
    while os.path.exists(_epoch_path(directory, k, done + 1)):
        done += 1
    return done


def train_experts(recipe: ExpertRecipe, images: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
                  dsa_strategy: Optional[str] = "color_crop_cutout_flip_scale_rotate", directory: Optional[str] = None, key: Optional[Dict[str, Any]] = None,
                  device: Union[str, torch.device] = "cpu", log: Optional[Callable[[str], None]] = None,
                  max_memory_bytes: int = 2 << 30,
                  on_epoch: Optional[Callable[[Sequence[int], int], None]] = None,
                  transition: Optional[torch.Tensor] = None) -> ExpertBuffer:
    """Trains (or loads, or resumes) the expert buffer of ``recipe`` on ``(images, labels)``.

    Args:
        images: ``float32 [n, C, H, W]`` already in network-input space (e.g. ZCA whitened); labels: ``int64 [n]``.
        num_classes: C.
        dsa_strategy: DSA on every training batch (one draw per batch, mode 'S'; MTT/DATM: all six groups);
            ``None`` or ``""``: no augmentation.
        directory: where the buffer lives (``None``: train in memory, nothing written, no resume). A complete
            buffer there is loaded (nothing retrained); a partial one is continued with the next epoch of each
            unfinished expert.
        key: JSON-able facts identifying the data (dataset, label digest, trust digest...); written to
            ``manifest.json`` and checked against an existing manifest (``ValueError`` on mismatch).
        device: where the experts train.
        log: ``log(str)`` progress messages.
        max_memory_bytes: buffers up to this size are returned in memory, larger ones read from disk on demand.
        on_epoch: test hook ``on_epoch(expert_indices, epoch)`` called after each epoch's snapshots are written.
        transition: optional ``[C, C]`` label-noise estimate ``T[i, j] = P(label j | true class i)``: the
            experts then minimise the forward-corrected cross-entropy ``-log (softmax(z) T)[y]`` (Patrini et al.,
            CVPR 2017; :func:`ddfast.noise.forward_corrected_cross_entropy`) instead of the plain one, and the
            buffer's identity includes T. The reported ``train_acc`` is the argmax of the clean-class posterior
            against the given labels.

    Returns:
        :class:`ExpertBuffer` with ``recipe.num_experts`` trajectories of ``recipe.epochs + 1`` snapshots.

    Distributed (module docstring): each rank trains its share of the experts, every rank returns the whole
    buffer; ``log`` and ``on_epoch`` then see this rank's experts only.

    Raises:
        ValueError: bad recipe fields, shapes, a class with no samples, or a directory holding another buffer.
    """
    recipe = recipe.validate()
    if dsa_strategy:
        DSA(dsa_strategy)  # raises ValueError naming a bad strategy
    if images.dim() != 4 or labels.shape != (images.shape[0],):
        raise ValueError(f"images must be [n, C, H, W] and labels [n], got {tuple(images.shape)} and "
                         f"{tuple(labels.shape)}")
    counts = torch.bincount(labels.cpu(), minlength=num_classes)
    if images.shape[0] == 0 or (counts == 0).any():
        raise ValueError(f"every class needs at least one training sample for the experts (counts {counts.tolist()})")
    dev = torch.device(device)
    say = log or (lambda s: None)
    recipe_key = {**recipe.key(), "dsa_strategy": dsa_strategy or None}
    if transition is not None:
        transition = transition.detach().to(torch.float64).cpu()
        if transition.shape != (num_classes, num_classes) or not bool(torch.isfinite(transition).all()):
            raise ValueError(f"transition must be a finite [{num_classes}, {num_classes}] matrix, got "
                             f"{tuple(transition.shape)}")
        recipe_key["transition"] = [[round(float(v), 8) for v in row] for row in transition]
    manifest = {"format": _FORMAT, "recipe": recipe.to_dict(), "recipe_key": recipe_key,
                "key": key or {}, "num_classes": int(num_classes), "n_train": int(images.shape[0]),
                "image_shape": list(images.shape[1:])}
    template = recipe.net.build(images.shape[1], num_classes, tuple(images.shape[2:]), seed=0).to(dev)
    template.train()
    P = sum(p.numel() for p in template.parameters())
    manifest["num_params"] = P
    stats: Dict[str, Any] = {}
    if directory is not None:
        os.makedirs(directory, exist_ok=True)
        mpath = os.path.join(directory, "manifest.json")
        if os.path.exists(mpath):
            try:
                with open(mpath, encoding="utf-8") as f:
                    old = json.load(f)
                if not isinstance(old, dict):
                    raise ValueError("not a JSON object")
            except (ValueError, UnicodeDecodeError) as exc:
                raise ValueError(f"{mpath} is corrupt ({' '.join(str(exc).split())}); delete {directory} to train "
                                 "the expert buffer again") from None
            for field_name in ("format", "recipe_key", "key", "num_params", "n_train"):
                if json.dumps(old.get(field_name), sort_keys=True) != json.dumps(manifest[field_name], sort_keys=True):
                    raise ValueError(f"{directory} holds another expert buffer ({field_name} differs); use another "
                                     "cache_dir or delete it")
            stats = old.get("stats", {})
        manifest["stats"] = stats
        if dd.is_main():
            atomic_write_json(manifest, mpath)

    E, N = recipe.epochs, recipe.num_experts
    vm_ok = not has_batchnorm(template)
    if recipe.vmap is True and not vm_ok:
        raise ValueError("vmap=True is not supported for batch-norm models; use vmap=False")
    parallel = N if recipe.parallel == 0 else min(recipe.parallel, N)
    # "auto": vmap on CUDA (fills the device with K small models); on CPU the loop was measured faster
    # (benchmarks/RESULTS.md, DATM section)
    vm = bool(recipe.vmap is True or (recipe.vmap == "auto" and parallel > 1 and vm_ok and dev.type == "cuda"))
    X = images.detach().to(dev, torch.float32)
    Y = labels.detach().to(dev)
    trainer = _Trainer(recipe, template, X, Y, num_classes, dev, dsa_strategy, transition)

    mem: Dict[int, List[torch.Tensor]] = {}
    progress = {k: _progress(directory, k, E) for k in range(N)}
    pending = [k for k in dd.shard_indices(N) if progress[k] <= E]  # this rank's unfinished experts
    # group experts by the epoch they continue from, then into chunks of `parallel`
    by_start: Dict[int, List[int]] = {}
    for k in pending:
        by_start.setdefault(max(progress[k], 0), []).append(k)
    t0 = time.perf_counter()
    for start in sorted(by_start):
        ks_all = by_start[start]
        for c0 in range(0, len(ks_all), parallel):
            ks = ks_all[c0:c0 + parallel]
            rows, moms = [], []
            for k in ks:
                if progress[k] >= 0:  # resume from the last written epoch
                    st = load_safetensors(_epoch_path(directory, k, progress[k]))
                    rows.append(st["params"].to(dev))
                    moms.append(st.get("momentum"))
                else:
                    w0 = trainer.init_params(k)
                    rows.append(w0)
                    moms.append(None)
                    if directory is not None:
                        save_safetensors({"params": w0}, _epoch_path(directory, k, 0))
                    else:
                        mem[k] = [w0.cpu()]
            W = torch.stack(rows)
            M = None if any(m is None for m in moms) else torch.stack([m.to(dev) for m in moms])
            for e in range(start, E):
                W, M, losses, accs = trainer.epoch(ks, e, W, M, vm)
                for i, k in enumerate(ks):
                    s = stats.setdefault(str(k), {"loss": [], "train_acc": []})
                    s["loss"] = s["loss"][:e] + [round(losses[i], 6)]
                    s["train_acc"] = s["train_acc"][:e] + [round(accs[i], 3)]
                    if directory is not None:
                        t = {"params": W[i]}
                        if M is not None:
                            t["momentum"] = M[i]
                        save_safetensors(t, _epoch_path(directory, k, e + 1))
                    else:
                        mem[k].append(W[i].detach().cpu())
                say(f"experts {ks[0]}..{ks[-1]} epoch {e + 1}/{E}: loss {sum(losses) / len(losses):.4f}, "
                    f"train acc {sum(accs) / len(accs):.2f}% ({time.perf_counter() - t0:.0f} s)")
                if directory is not None and dd.is_main():
                    manifest["stats"] = stats
                    atomic_write_json(manifest, os.path.join(directory, "manifest.json"))
                if on_epoch is not None:
                    on_epoch(ks, e + 1)
            if directory is not None:  # consolidate finished experts
                for k in ks:
                    traj = torch.stack([load_safetensors(_epoch_path(directory, k, e))["params"]
                                        for e in range(E + 1)])
                    save_safetensors({"trajectory": traj}, _final_path(directory, k),
                                     metadata={"expert": str(k), "epochs": str(E)})
                    shutil.rmtree(os.path.join(directory, f"expert_{k:04d}"), ignore_errors=True)
    seconds = time.perf_counter() - t0
    trajs = {k: torch.stack(mem[k]) for k in mem}  # without a directory: this rank's trajectories
    if dd.is_distributed():  # all ranks get here once every expert is consolidated on disk (or in `trajs`)
        owned = {str(k): stats[str(k)] for k in dd.shard_indices(N) if str(k) in stats}
        parts = dd.all_gather_object((owned, trajs, seconds))
        for part_stats, part_trajs, _ in parts:
            stats.update(part_stats)
            trajs.update(part_trajs)
        stats = {str(k): stats[str(k)] for k in range(N) if str(k) in stats}
        seconds = max(part[2] for part in parts)
        if directory is not None:
            if dd.is_main():
                manifest["stats"] = stats
                atomic_write_json(manifest, os.path.join(directory, "manifest.json"))
            dd.barrier()
    meta = {"recipe": recipe.to_dict(), "dsa_strategy": dsa_strategy or None, "key": key or {}, "stats": stats, "vmapped": vm,
            "seconds": seconds, "directory": directory}
    if directory is None:
        return ExpertBuffer(trajectories=torch.stack([trajs[k] for k in range(N)]), meta=meta)
    files = [_final_path(directory, k) for k in range(N)]
    buf = ExpertBuffer(files=files, num_epochs=E, num_params=P, meta=meta)
    if buf.nbytes() <= max_memory_bytes:
        trajs_in = [_checked_trajectory(f, E, P, directory) for f in files]
        buf = ExpertBuffer(trajectories=torch.stack(trajs_in), meta=meta)
    else:
        for f in files:  # shapes from the headers, values checked when a snapshot is read
            _checked_trajectory(f, E, P, directory, values=False)
    return buf


def _checked_trajectory(path: str, E: int, P: int, directory: str, values: bool = True) -> torch.Tensor:
    """An expert's stored trajectory ``[E + 1, P]``, or a ``ValueError`` naming the file and how to rebuild."""
    fix = f"delete {directory} to train the expert buffer again"
    try:
        if not values:
            from safetensors import safe_open

            with safe_open(path, framework="pt", device="cpu") as f:
                shape = tuple(f.get_slice("trajectory").get_shape())
            t = None
        else:
            t = load_safetensors(path)["trajectory"]
            shape = tuple(t.shape)
    except Exception as exc:  # noqa: BLE001 - a corrupt or foreign file
        raise ValueError(f"{path}: not a readable expert trajectory ({type(exc).__name__}); {fix}") from None
    if shape != (E + 1, P):
        raise ValueError(f"{path}: a trajectory of shape {shape}, expected {(E + 1, P)}; {fix}")
    if t is not None and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{path}: the trajectory holds NaN or inf; {fix}")
    return t
