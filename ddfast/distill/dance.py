"""DANCE -- Dual-view distribution AligNment for dataset CondEnsation (Zhang, Li, Lin, Wang, Qian, Ge;
IJCAI 2024, arXiv 2406.01063; official code Hansong-Zhang/DANCE, built on IDC).

What is distilled
-----------------
``C x ipc`` *stored* images ``S`` in pixel space ``[0, 1]`` (``float32 [C*ipc, ch, H, W]``, the dataset's own
size). With multi-formation factor ``f`` (IDC, Kim et al. ICML 2022) every stored image holds ``f x f``
tiles; :func:`decode` cuts them out and resizes each (bilinear) back to ``H x W``, so one stored image gives
``f^2`` training images. ``config.ipc`` counts **stored** images per class (the storage budget, as in the
papers' tables); the :class:`SyntheticSet` holds the **decoded** set, ``ipc * f^2`` images per class, which
is what evaluation trains on (the reference's ``Synthesizer.loader``). ``SyntheticSet.ipc`` is the stored
count; ``metadata["decoded_per_class"]`` the decoded one.

The loop (``DANCE.py``'s ``condense``; one :meth:`DANCE.step`)
-------------------------------------------------------------
::

    k ~ U{0..num_premodel-1}, lam ~ U(0, 1)                      (both from self.generator)
    theta_mid = lam * theta_init[k] + (1 - lam) * theta_final[k]  (pseudo-intermediate "middle encoder")
    S <- clamp(S, 0, 1)
    for c in classes:                                              # inner-class view: PLTDA, eq. (PLTDA)
        R = batch_real random real images of class c; X = decode(S_c) (at most batch_syn_max, subsampled)
        A = DiffAug(color_crop_cutout) with ONE parameter set for R and X (siamese, batch-shared),
            applied after the mean/std normalisation
        L = || mean phi_mid(A(R)) - mean phi_mid(A(X)) ||_2^2      (phi: flattened last feature map)
        one SGD step on S
    repeat iter_calib times:                                       # inter-class view: calibration
        for c in classes: L = CE(f_final(A(decode(S_c))), c) [+ extra_loss]; one SGD step on S
    optimiser: SGD(S, lr = lr_img = 0.01 * ipc, momentum 0.5) over all stored images

PLTDA (paper §3.2, "pseudo long-term distribution alignment") is DM's linear-kernel MMD (Zhao & Bilen,
WACV 2023, eq. 4) through interpolated encoders; the calibration (paper §3.3) is the cross entropy of the
fully trained expert. As in the reference they are *not* summed: each drives its own per-class steps of
the one image optimiser, so every per-class step also moves the other classes' images by momentum.

``batched_classes=True`` (off by default) runs all classes in one forward: the PLTDA
loss becomes ``sum_c L_c`` (segmented per-class means) and the calibration ``sum_c CE_c`` (each class's
mean CE), each one optimiser step per iteration instead of ``C``. Every image receives the same gradient it
would get in its own class step, but the optimiser semantics change: 2 momentum steps per iteration
instead of ``2C`` (so momentum now carries over between iterations), and class ``c``'s step no longer sees
the momentum-moved images of classes ``< c``.

TAD (:mod:`ddfast.tad`)
------------------------
- The pool is trained on ``TrainSet.effective()`` (trusted samples, replacement labels); real batches,
  the random/mix initialisation and the per-class statistics come only from the trusted samples.
- ``extra_loss(images, labels)`` (TAD's consistency term) is added to the objective of every calibration
  step, called with that class's decoded synthetic images in network-input space (normalised, not
  augmented, ``float32 [n_c, ch, H, W]``) and their hard labels (``int64 [n_c]``). With ``iter_calib = 0``
  it gets its own per-class step instead.
- With ``TrainSet.soft_labels`` (TAD's ``divert_real="posterior_soft"``) class ``c``'s real batches are
  ``batch_real`` distinct images drawn with probability proportional to ``soft_labels[:, c]`` (the posterior
  probability that the image is of class ``c``) from every image, instead of uniformly from those labelled ``c``:
  the matched class means are posterior-weighted means. The initialisation still uses the hard labels.
- :meth:`DANCE.update_train` swaps the real view (per-class statistics from the new trusted set); the pool
  is rebuilt from the new view only with ``rebuild_pool=True``. :meth:`prepare` keeps a pool already in
  memory, so ``run(..., initialize=False)`` in later TAD rounds does not retrain it.

Deviations from the reference (documented choices)
--------------------------------------------------
- Real batches: ``batch_real`` distinct images of the class drawn afresh every step (the reference cycles
  per-class shuffled epochs); the 'random'/'mix' initialisation uses random real images (the reference takes
  the first ones of each class).
- The pool is held in memory (never reloaded); the expert/middle encoder are loaded from it.
- Output images are clamped to [0, 1] before decoding (the reference clamps at the start of each
  iteration; its ``test.py`` notes that clamping the final data makes no difference).
- Evaluation reports the **last-epoch** accuracy; DANCE's code reports the best over checkpoints every 250
  epochs, which is optimistic.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..augment import Normalize, diffaug
from ..config import option, set_path
from ..data import canonical_name
from ..hashing import tensor_digest
from ..models import load_flat
from .base import Distiller, DistillConfig, SyntheticSet, TrainSet
from .pool import ModelPool, PoolConfig, build_pool

__all__ = ["DANCE", "DANCEConfig", "preset_config", "PRESET_DOCS", "decode", "mix_tiles", "dance_eval_config",
           "images_digest"]

_INITS = ("auto", "random", "mix", "noise")
# datasets whose evaluation augmentation drops horizontal flips (the reference: mnist, svhn)
_NO_FLIP = ("mnist", "digits", "svhn")


# ----------------------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------------------
@dataclass
class DANCEConfig(DistillConfig):
    """DANCE's options. Defaults: the official ``--reproduce`` values for CIFAR-10/100 and the other small
    datasets (``arguments/reproduce_condense.py``, ``arg_condense.py``, ``reproduce_pretrain.py``).

    Attributes:
        ipc: stored images per class (module docstring); iterations: ``niter`` (10,000).
        factor: multi-formation factor ``f`` (>= 1; 2 = IDC/DANCE's choice for the small datasets).
        decode_type: ``"single"`` (uniform multi-formation; the reference's non-ImageNet default).
        init: ``"auto"`` (``"mix"`` when ``factor > 1``, else ``"random"``, as the reference forces),
            ``"random"`` (random real images of the class), ``"mix"`` (``f^2`` real images resized into the
            tiles) or ``"noise"`` (``clamp(N(0,1)/4 + 0.5)``).
        lr_img: image learning rate; ``None`` = ``0.01 * ipc`` (reproduce setting). mom_img: 0.5.
        batch_real: real images per class per step (128). batch_syn_max: decoded synthetic images per class
            per step at most (200; subsampled at random above that).
        num_premodel: pool models sampled from (the first ``num_premodel`` of the pool; 5).
        iter_calib: calibration rounds per iteration (1; 0 turns the inter-class view off).
        aug_type: DiffAug strategy for matching and calibration (``"color_crop_cutout"``, batch-shared).
        batched_classes: all classes in one forward, one step per view (module docstring). Off.
        pool: the pretrained pool (:class:`ddfast.distill.pool.PoolConfig`, a nested config): ``net`` (the
            ConvNet of the middle encoders and the calibration expert: ConvNet-3, width 128, instance norm),
            ``amount`` (``pretrain_amount``, 20), ``epochs`` (``pretrain_epochs``, 60), SGD ``lr`` 0.01 /
            ``momentum`` 0.9 / ``weight_decay`` 5e-4, ``batch_size`` 64, DiffAug ``aug`` ``"color_crop"``, CutMix
            ``cutmix_p`` 0.5 / ``cutmix_beta`` 1, ``subset`` 0 (all samples), ``seed`` 0 (independent of ``seed``
            so that runs share a cached pool). Set with ``pool={"epochs": 4}`` or ``-O distill.pool.epochs=4``.
        eval_width, eval_epochs, eval_runs: the evaluation network width (ConvNet-3), epochs (1500) and
            number of runs (5) written into ``SyntheticSet.eval_config``.
        eval_dsa_strategy: evaluation DSA strategy; ``None`` = ``color_crop_flip_scale_rotate`` (no flip for
            MNIST-like data, as the reference).

    Raises:
        ValueError: a bad value, naming the field.
    """

    iterations: int = option(10000, ge=1)
    checkpoint_every: int = option(500, ge=1)
    seed: int = option(0, ge=0)
    factor: int = option(2, ge=1)
    decode_type: str = option("single", choices=("single",))
    init: str = option("auto", choices=_INITS)
    lr_img: Optional[float] = option(None, gt=0)
    mom_img: float = option(0.5, ge=0, lt=1)
    batch_real: int = option(128, ge=1)
    batch_syn_max: int = option(200, ge=1)
    num_premodel: int = option(5, ge=1)
    iter_calib: int = option(1, ge=0)
    aug_type: str = option("color_crop_cutout")
    batched_classes: bool = option(False)
    pool: PoolConfig = option(factory=PoolConfig)
    eval_width: int = option(128, ge=1)
    eval_epochs: int = option(1500, ge=1)
    eval_runs: int = option(5, ge=1)
    eval_dsa_strategy: Optional[str] = option(None)

    def check(self) -> None:
        for name in ("aug_type", "eval_dsa_strategy"):
            value = getattr(self, name)
            if value is not None:
                try:
                    diffaug(value)
                except (ValueError, TypeError) as exc:
                    self.fail(name, f"is not a DiffAug strategy: {exc}")
        if self.pool.net.model not in ("convnet", "convnet_datm"):
            self.fail("pool.net.model", f"must be 'convnet' (DANCE's ConvNet), got {self.pool.net.model!r}")
        if self.num_premodel > self.pool.amount:
            self.fail("num_premodel", f"({self.num_premodel}) must be <= pool.amount ({self.pool.amount})")

    @property
    def lr_img_resolved(self) -> float:
        """``lr_img``, or ``0.01 * ipc`` (reproduce setting) when it is ``None``."""
        return float(self.lr_img) if self.lr_img is not None else 0.01 * self.ipc

    @property
    def init_resolved(self) -> str:
        if self.init == "auto":
            return "mix" if self.factor > 1 else "random"
        return self.init


# ----------------------------------------------------------------------------------------------------------
# multi-formation
# ----------------------------------------------------------------------------------------------------------
def decode(images: torch.Tensor, factor: int, pad_value: float = 0.5) -> torch.Tensor:
    """IDC's uniform multi-formation decode (Kim et al., ICML 2022, §3.2; ``Synthesizer.decode_zoom``).

    Each image is padded (bottom/right, ``pad_value``) to a multiple of ``factor``, cut into ``factor x factor``
    tiles of ``ceil(H/f) x ceil(W/f)`` pixels and every tile is resized back to ``H x W`` (bilinear,
    ``align_corners=False``). Differentiable w.r.t. ``images``.

    Args:
        images: ``float [n, C, H, W]``.
        factor: ``f >= 1`` (``f = 1`` returns ``images``).

    Returns:
        ``float [f^2 * n, C, H, W]`` in tile-major order: rows ``t*n .. (t+1)*n - 1`` are tile
        ``t = i*f + j`` (row ``i``, column ``j``) of images ``0 .. n-1``.

    Raises:
        ValueError: bad ``images`` or ``factor`` (< 1 or larger than the image).
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"images must be [n, C, H, W], got {getattr(images, 'shape', type(images))}")
    f = int(factor)
    n, c, H, W = images.shape
    if f < 1 or f > min(H, W):
        raise ValueError(f"factor must be in [1, {min(H, W)}] for {H}x{W} images, got {factor}")
    if f == 1:
        return images
    ph, pw = (-H) % f, (-W) % f
    x = F.pad(images, (0, pw, 0, ph), value=pad_value) if (ph or pw) else images
    sh, sw = (H + ph) // f, (W + pw) // f
    tiles = x.reshape(n, c, f, sh, f, sw).permute(2, 4, 0, 1, 3, 5).reshape(f * f * n, c, sh, sw)
    return F.interpolate(tiles, size=(H, W), mode="bilinear", align_corners=False)


def mix_tiles(real: torch.Tensor, n: int, factor: int) -> torch.Tensor:
    """IDC/DANCE's 'mix' initialisation (``Synthesizer.init(init_type='mix')``): ``f^2`` real images per
    stored image, each resized (nearest) into one tile.

    Args:
        real: ``float [f^2 * n, C, H, W]``; images ``t*n .. (t+1)*n - 1`` fill tile ``t = i*f + j``.
        n: stored images to build.
        factor: ``f``; tile heights are ``H // f`` (+1 for the first ``H % f`` rows of tiles), widths alike.

    Returns:
        ``float [n, C, H, W]``.

    Raises:
        ValueError: ``real`` does not hold ``f^2 * n`` images.
    """
    f = int(factor)
    if real.dim() != 4 or real.shape[0] != f * f * n:
        raise ValueError(f"real must be [{f * f * n}, C, H, W] for n={n}, factor={f}, got {tuple(real.shape)}")
    _, c, H, W = real.shape
    hs = [H // f + (1 if i < H % f else 0) for i in range(f)]
    ws = [W // f + (1 if j < W % f else 0) for j in range(f)]
    out = real.new_empty(n, c, H, W)
    t, y0 = 0, 0
    for i in range(f):
        x0 = 0
        for j in range(f):
            out[:, :, y0:y0 + hs[i], x0:x0 + ws[j]] = F.interpolate(real[t * n:(t + 1) * n], size=(hs[i], ws[j]),
                                                                    mode="nearest")
            x0 += ws[j]
            t += 1
        y0 += hs[i]
    return out


def images_digest(images: torch.Tensor) -> str:
    """16 hex digits of SHA-256 over the image shape and bytes (pool cache keys)."""
    return tensor_digest(images, with_meta=True)


def dance_eval_config(config: DANCEConfig, dataset: str = "custom") -> Dict[str, Any]:
    """DANCE's evaluation protocol as :class:`ddfast.evaluate.EvalConfig` fields (``arg_condense.py``,
    ``train.py``): ConvNet-3 (width ``eval_width``), SGD lr 0.01, momentum 0.9, wd 5e-4,
    batch 64, MultiStepLR x0.2 at 2/3 and 5/6, ``eval_epochs`` epochs, CE on hard labels, DSA
    ``color_crop_flip_scale_rotate`` in IDC's mode (flip and colour always, one of crop/scale/rotate per
    batch, per-sample parameters) + CutMix p 0.5, beta 1. Accuracy: last epoch."""
    ds = canonical_name(dataset)
    strategy = config.eval_dsa_strategy
    if strategy is None:
        strategy = "color_crop_scale_rotate" if ds in _NO_FLIP else "color_crop_flip_scale_rotate"
    return {"model": "convnet", "model_kwargs": {"width": int(config.eval_width), "depth": 3}, "lr": 0.01,
            "epochs": int(config.eval_epochs), "num_runs": int(config.eval_runs), "batch_size": 64, "loss": "ce",
            "optimizer": "sgd", "momentum": 0.9, "weight_decay": 5e-4, "schedule": "multistep", "dsa": True,
            "dsa_strategy": strategy, "dsa_mode": "idc", "cutmix_p": 0.5, "cutmix_beta": 1.0}


# ----------------------------------------------------------------------------------------------------------
# the distiller
# ----------------------------------------------------------------------------------------------------------
class DANCE(Distiller):
    """DANCE distiller (module docstring). ``DANCE(config, device=..., cache_dir=..., quiet=...)``.

    Attributes (after :meth:`prepare` / :meth:`initialize`):
        pool: :class:`ddfast.distill.pool.ModelPool` (initial and final parameters in memory).
        data: the stored images ``float32 [C*ipc, ch, H, W]`` (pixel space, leaf tensor with grad).
        opt: ``torch.optim.SGD([data], lr_img, momentum=mom_img)``.
    """

    name = "dance"
    config_class = DANCEConfig

    def __init__(self, config: DANCEConfig, *, device="cpu", cache_dir: Optional[str] = None, quiet: bool = False):
        super().__init__(config, device=device, cache_dir=cache_dir, quiet=quiet)
        self.pool: Optional[ModelPool] = None
        self.data: Optional[torch.Tensor] = None
        self.opt: Optional[torch.optim.Optimizer] = None
        self.normalize: Optional[Normalize] = None
        self.aug = diffaug(config.aug_type)
        self._pool_fp: Optional[str] = None
        self._mid: Optional[nn.Module] = None
        self._expert: Optional[nn.Module] = None
        self._expert_k: Optional[int] = None
        self._real: Optional[torch.Tensor] = None
        self._soft: Optional[torch.Tensor] = None
        self._class_pos: List[torch.Tensor] = []
        self._dataset = "custom"
        self._num_classes = 0

    # ---- setup -----------------------------------------------------------------------------------------
    def cache_key(self, train: TrainSet) -> Dict[str, Any]:
        """Dataset, label digest (labels + trusted mask + replacement labels: noise and trust) and an image
        digest; the pool recipe is added by :func:`build_pool`."""
        key = super().cache_key(train)
        key["images"] = images_digest(train.images)
        key["num_classes"] = int(train.num_classes)
        key["mean"], key["std"] = list(map(float, train.mean)), list(map(float, train.std))
        return key

    def _check_train(self, train: TrainSet) -> None:
        if not isinstance(train, TrainSet):
            raise TypeError(f"train must be a TrainSet, got {type(train).__name__}")
        H, W = train.im_size
        if self.config.factor > min(H, W):
            raise ValueError(f"factor ({self.config.factor}) is larger than the images ({H}x{W})")
        counts = [int(ix.numel()) for ix in train.class_indices()]
        empty = [c for c, k in enumerate(counts) if k == 0]
        if empty:
            raise ValueError(f"DANCE needs (trusted) real images of every class; none for class(es) {empty}")

    def build_pool(self, train: TrainSet) -> ModelPool:
        """(Re)builds the pool from ``train.effective()`` (cached in ``cache_dir`` when given), with forward loss
        correction when ``train.transition`` is set."""
        images, labels, _ = train.effective()
        norm = Normalize(train.mean, train.std)
        key = self.cache_key(train) if self.cache_dir is not None else None
        return self.set_pool(build_pool(images, labels, train.num_classes, norm, self.config.pool,
                                        key=key, cache_dir=self.cache_dir, device=self.device, quiet=self.quiet,
                                        transition=train.transition))

    def set_pool(self, pool: ModelPool) -> ModelPool:
        """Installs a pool (e.g. one built elsewhere); it needs at least ``num_premodel`` models.

        Raises:
            ValueError: too few models.
        """
        if len(pool) < self.config.num_premodel:
            raise ValueError(f"the pool has {len(pool)} models, num_premodel is {self.config.num_premodel}")
        self.pool = pool.to(self.device)
        self._pool_fp = pool.fingerprint()
        # train mode as in the reference (a batch-norm net normalises with batch statistics; instance norm
        # behaves the same in both modes)
        self._mid = pool.module(pool.finals[0]).to(self.device).train()
        self._expert = pool.module(pool.finals[0]).to(self.device).train()
        self._expert_k = None
        return pool

    def _set_real(self, train: TrainSet) -> None:
        idx = train.effective_indices()
        lab = train.effective_labels()[idx]
        if train.trusted_mask is None:
            real = train.images
        else:
            real = train.images[idx]
        self._real = real.to(self.device, torch.float32)
        self._class_pos = [torch.nonzero(lab == c, as_tuple=False).flatten().to(self.device)
                           for c in range(train.num_classes)]
        # soft labels (TAD's posterior distribution): class c's real batches are drawn with probability
        # P(true c | x, given label) instead of from the images labelled c
        self._soft = None if train.soft_labels is None else train.soft_labels[idx].double().cpu()
        self.normalize = Normalize(train.mean, train.std)
        self._dataset = train.name
        self._num_classes = int(train.num_classes)

    def prepare(self, train: TrainSet) -> None:
        """Builds or loads the pool (unless one is in memory already) and indexes the trusted real images."""
        self._check_train(train)
        if self.pool is None:
            self.build_pool(train)
        self._set_real(train)

    def update_train(self, train: TrainSet, rebuild_pool: bool = False) -> None:
        """TAD: a new trusted view. Real batches and per-class statistics come from ``train`` from now on;
        the pool is rebuilt from it only if ``rebuild_pool``. The synthetic set and optimiser are kept."""
        self._check_train(train)
        self.train = train
        if rebuild_pool or self.pool is None:
            self.build_pool(train)
        self._set_real(train)

    def initialize(self, train: TrainSet) -> None:
        """Stored images from real images of each class (``init``), and the image optimiser."""
        cfg = self.config
        if self._real is None:
            self.prepare(train)
        C, ipc, f = train.num_classes, cfg.ipc, cfg.factor
        init = cfg.init_resolved
        need = ipc * f * f if init == "mix" else ipc
        ch, H, W = train.images.shape[1:]
        data = torch.empty(C * ipc, ch, H, W, dtype=torch.float32, device=self.device)
        if init == "noise":
            noise = torch.randn(C * ipc, ch, H, W, generator=self.generator)
            data.copy_((noise / 4 + 0.5).clamp(0.0, 1.0))
        else:
            small = [c for c in range(C) if self._class_pos[c].numel() < need]
            if small:
                raise ValueError(f"ipc={ipc} with factor={f} (init {init!r}) needs {need} (trusted) real images "
                                 f"per class; class(es) {small} have fewer")
            for c in range(C):
                pos = self._class_pos[c]
                pick = pos[torch.randperm(pos.numel(), generator=self.generator)[:need].to(pos.device)]
                real = self._real[pick]
                data[c * ipc:(c + 1) * ipc] = mix_tiles(real, ipc, f) if init == "mix" else real
        self.data = data.requires_grad_(True)
        self.opt = torch.optim.SGD([self.data], lr=cfg.lr_img_resolved, momentum=cfg.mom_img)

    # ---- pieces of a step --------------------------------------------------------------------------------
    def _seed(self) -> int:
        return int(torch.randint(2 ** 62, (1,), generator=self.generator))

    def _sample_real(self, c: int) -> torch.Tensor:
        if self._soft is not None:
            w = self._soft[:, c]
            k = min(self.config.batch_real, int((w > 0).sum()))
            take = torch.multinomial(w, k, replacement=False, generator=self.generator)
            return self._real[take.to(self._real.device)]
        pos = self._class_pos[c]
        take = torch.randperm(pos.numel(), generator=self.generator)[:self.config.batch_real]
        return self._real[pos[take.to(pos.device)]]

    def _syn_class(self, c: int) -> torch.Tensor:
        ipc = self.config.ipc
        x = decode(self.data[c * ipc:(c + 1) * ipc], self.config.factor)
        if x.shape[0] > self.config.batch_syn_max:
            take = torch.randperm(x.shape[0], generator=self.generator)[:self.config.batch_syn_max]
            x = x[take.to(x.device)]
        return x

    def _load_encoders(self, k: int, lam: torch.Tensor) -> None:
        with torch.no_grad():
            load_flat(self._mid, self.pool.middle(k, lam))
            if self._expert_k != k:
                load_flat(self._expert, self.pool.finals[k])
                self._expert_k = k

    def middle_encoder(self, k: int, lam: float) -> nn.Module:
        """The middle encoder ``theta_mid`` for pool model ``k`` and ``lam`` as a frozen module."""
        return self.pool.module(self.pool.middle(k, lam))

    def pltda_loss(self, model: nn.Module, real: torch.Tensor, syn: torch.Tensor, seed: int) -> torch.Tensor:
        """PLTDA / DM loss (Zhang et al., IJCAI 2024, eq. 4): ``||mean phi(A(real)) - mean phi(A(syn))||^2`` with one
        batch-shared DiffAug draw ``seed`` for both batches, after normalisation. ``real``/``syn``:
        ``float [n, ch, H, W]`` in [0, 1]; gradient flows into ``syn`` only. Returns a scalar."""
        with torch.no_grad():
            fr = model.embed(self.aug(self.normalize(real), seed)).mean(0)
        fs = model.embed(self.aug(self.normalize(syn), seed)).mean(0)
        return (fr - fs).pow(2).sum()

    def calib_loss(self, model: nn.Module, syn: torch.Tensor, c: int, seed: int) -> torch.Tensor:
        """Distribution calibration (Zhang et al., IJCAI 2024, eq. 6): ``CE(f_expert(A(syn)), c)`` (mean over images)."""
        logits = model(self.aug(self.normalize(syn), seed))
        return F.cross_entropy(logits, torch.full((syn.shape[0],), c, dtype=torch.long, device=syn.device))

    def _extra(self, syn: torch.Tensor, c: int) -> torch.Tensor:
        lab = torch.full((syn.shape[0],), c, dtype=torch.long, device=syn.device)
        return self.extra_loss(self.normalize(syn), lab)

    def _update(self, loss: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    # ---- the step ------------------------------------------------------------------------------------------
    def step(self) -> Dict[str, float]:
        """One DANCE iteration (module docstring); metrics: ``loss`` (= ``pltda + calib`` [+ ``extra``]),
        ``pltda`` (mean over classes), ``calib`` (mean over classes and rounds), ``lam``, ``model``."""
        cfg = self.config
        g = self.generator
        k = int(torch.randint(cfg.num_premodel, (1,), generator=g))
        lam = torch.rand(1, generator=g)
        self._load_encoders(k, lam.to(self.pool.inits.device))
        with torch.no_grad():
            self.data.clamp_(0.0, 1.0)
        if cfg.batched_classes:
            pltda, calib, extra = self._step_batched()
        else:
            pltda, calib, extra = self._step_per_class()
        out = {"loss": pltda + calib + extra, "pltda": pltda, "calib": calib, "lam": float(lam), "model": k}
        if self.extra_loss is not None:
            out["extra"] = extra
        return out

    def _step_per_class(self):
        cfg = self.config
        C = self._num_classes
        pl = 0.0
        for c in range(C):
            real = self._sample_real(c)
            syn = self._syn_class(c)
            loss = self.pltda_loss(self._mid, real, syn, self._seed())
            self._update(loss)
            pl += float(loss.detach())
        ca, ex = 0.0, 0.0
        for _ in range(cfg.iter_calib):
            for c in range(C):
                syn = self._syn_class(c)
                loss = self.calib_loss(self._expert, syn, c, self._seed())
                ca += float(loss.detach())
                if self.extra_loss is not None:
                    e = self._extra(syn, c)
                    ex += float(e.detach())
                    loss = loss + e
                self._update(loss)
        if cfg.iter_calib == 0 and self.extra_loss is not None:
            for c in range(C):
                e = self._extra(self._syn_class(c), c)
                ex += float(e.detach())
                self._update(e)
        rounds = max(cfg.iter_calib, 1)
        return pl / C, ca / (C * rounds), ex / (C * rounds)

    def _step_batched(self):
        cfg = self.config
        C = self._num_classes
        reals = [self._sample_real(c) for c in range(C)]
        syns = [self._syn_class(c) for c in range(C)]
        seeds = [self._seed() for _ in range(C)]
        with torch.no_grad():
            xr = torch.cat([self.aug(self.normalize(r), s) for r, s in zip(reals, seeds)])
            er = self._mid.embed(xr)
        xs = torch.cat([self.aug(self.normalize(x), s) for x, s in zip(syns, seeds)])
        es = self._mid.embed(xs)
        loss = es.new_zeros(())
        for mr, ms in zip(torch.split(er, [r.shape[0] for r in reals]), torch.split(es, [x.shape[0] for x in syns])):
            loss = loss + (mr.mean(0) - ms.mean(0)).pow(2).sum()
        self._update(loss)
        pl = float(loss.detach()) / C
        ca = ex = 0.0
        for _ in range(max(cfg.iter_calib, 1 if self.extra_loss is not None else 0)):
            syns = [self._syn_class(c) for c in range(C)]
            total = es.new_zeros(())
            if cfg.iter_calib > 0:
                seeds = [self._seed() for _ in range(C)]
                xs = torch.cat([self.aug(self.normalize(x), s) for x, s in zip(syns, seeds)])
                logits = self._expert(xs)
                for c, lg in enumerate(torch.split(logits, [x.shape[0] for x in syns])):
                    l_c = F.cross_entropy(lg, torch.full((lg.shape[0],), c, dtype=torch.long, device=lg.device))
                    total = total + l_c
                ca += float(total.detach())
            if self.extra_loss is not None:
                for c, x in enumerate(syns):
                    e = self._extra(x, c)
                    ex += float(e.detach())
                    total = total + e
            self._update(total)
        rounds = max(cfg.iter_calib, 1)
        return pl, ca / (C * rounds), ex / (C * rounds)

    # ---- output ----------------------------------------------------------------------------------------------
    def stored_images(self) -> torch.Tensor:
        """``float32 [C*ipc, ch, H, W]``: the stored (undecoded) images in [0, 1] (clamped copy)."""
        return self.data.detach().clamp(0.0, 1.0).clone()

    def decoded_images(self) -> torch.Tensor:
        """``float32 [C*ipc*f^2, ch, H, W]`` in [0, 1]: every class's decoded images, class by class
        (tile-major within a class), as evaluation trains on them."""
        ipc, f = self.config.ipc, self.config.factor
        x = self.stored_images()
        with torch.no_grad():
            return torch.cat([decode(x[c * ipc:(c + 1) * ipc], f) for c in range(self._num_classes)])

    def synthetic_set(self) -> SyntheticSet:
        """The decoded set in network-input space (normalised; no ZCA), hard labels, DANCE's evaluation
        protocol in ``eval_config`` and the input transform in ``preprocess``/``preprocess_state``."""
        cfg = self.config
        C, f = self._num_classes, cfg.factor
        per = cfg.ipc * f * f
        with torch.no_grad():
            images = self.normalize(self.decoded_images()).cpu()
        labels = torch.arange(C, dtype=torch.long).repeat_interleave(per)
        mean = [float(v) for v in self.normalize.mean.tolist()]
        std = [float(v) for v in self.normalize.std.tolist()]
        meta = {"iterations": int(self.iteration), "config": cfg.to_dict(), "factor": f, "stored_ipc": cfg.ipc,
                "decoded_per_class": per, "lr_img": cfg.lr_img_resolved, "init": cfg.init_resolved,
                "dataset": self._dataset, "n_real_used": int(self._real.shape[0]) if self._real is not None else 0,
                "pool": {"models": len(self.pool) if self.pool is not None else 0,
                         "digest": getattr(self.pool, "digest", None), "fingerprint": self._pool_fp,
                         "train_acc": [i.get("train_acc") for i in (self.pool.info if self.pool else [])]},
                "accuracy_protocol": "last epoch (DANCE's code reports the best over checkpoints)",
                "timings": {k: dict(v) for k, v in self.timer.stages.items()}}
        return SyntheticSet(images=images, labels=labels, num_classes=C, ipc=cfg.ipc, method=self.name, lr=None,
                            preprocess={"transform": "normalize", "mean": mean, "std": std, "zca": False},
                            preprocess_state=self.normalize.state_dict(),
                            eval_config=dance_eval_config(cfg, self._dataset), metadata=meta)

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Stored images, the optimiser (momentum) and the pool fingerprint (the pool itself is rebuilt or
        loaded from ``cache_dir`` by :meth:`prepare`; a different pool refuses to resume)."""
        return {"data": self.data.detach().cpu().clone(), "opt": self.opt.state_dict(),
                "pool_fingerprint": self._pool_fp}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("pool_fingerprint") != self._pool_fp:
            raise ValueError("the checkpoint was distilled with another model pool (fingerprint "
                             f"{state.get('pool_fingerprint')} vs {self._pool_fp}); resume with the same "
                             "cache_dir, training set and pretrain_* options")
        data = state["data"]
        if self.data is None or tuple(data.shape) != tuple(self.data.shape):
            raise ValueError(f"checkpoint images {tuple(data.shape)} do not match the config "
                             f"({None if self.data is None else tuple(self.data.shape)})")
        with torch.no_grad():
            self.data.copy_(data.to(self.data.device))
        self.opt.load_state_dict(state["opt"])
        self._expert_k = None


# ----------------------------------------------------------------------------------------------------------
# presets
# ----------------------------------------------------------------------------------------------------------
PRESET_DOCS = {
    "full": ("Official --reproduce values (Hansong-Zhang/DANCE arguments/reproduce_*.py): 10,000 iterations, "
             "lr_img 0.01*IPC (SGD, momentum 0.5), batch_real 128, batch_syn_max 200, factor 2, ConvNet-3 width "
             "128; pool of 20 models x 60 epochs, num_premodel 5, iter_calib 1; evaluation ConvNet-3, 1500 "
             "epochs, 5 runs, DSA + CutMix. Same values for CIFAR-10/100, Fashion-MNIST and MNIST (IPC 1/10/50). "
             "Meant for a GPU."),
    "quick": ("2-core CPU in a few minutes, pool pretraining included: ConvNet-3 width 32, 5 pool models x 5 "
              "epochs on 12,000 samples (num_premodel 5), 500 iterations, batch_real 64, factor 2, lr_img "
              "0.05*IPC (the narrower network's 512-d features give smaller PLTDA gradients); evaluation "
              "ConvNet-3 width 32, 300 epochs, 5 runs, otherwise DANCE's protocol."),
}


def preset_config(preset: str, dataset: str, ipc: int, **overrides: Any) -> DANCEConfig:
    """DANCE's config for a preset.

    ``"full"``: the official reproduce values (``arguments/reproduce_*.py``) for every small dataset: the reference's
    ``--reproduce`` branch applies one setting to CIFAR-10/100, SVHN, MNIST and Fashion-MNIST alike
    (Fashion-MNIST: 28x28x1, ConvNet's first conv padded by 3 so the features are 128x4x4 as for CIFAR,
    evaluation with flips). Factor 2 for IPC 1/10/50: the repository gives no per-IPC factor; factor 2 is
    IDC's setting for these datasets, the README's example (IPC 50) and the noisy-label study's DANCE
    protocol (Cheng et al., arXiv 2411.11924, ``Kciiiman/DD_LNL``). At IPC 50 with factor 2 the 200 decoded images per class equal
    ``batch_syn_max``, so every decoded image takes part in every step.

    ``"quick"``: see :data:`PRESET_DOCS` (tuned on Fashion-MNIST IPC 10; benchmarks/RESULTS.md).

    Raises:
        ValueError: unknown preset, bad ``ipc``, unknown or bad override (named).
    """
    if preset not in ("quick", "full"):
        raise ValueError(f"unknown preset {preset!r}; choose 'quick' or 'full'")
    if isinstance(ipc, bool) or not isinstance(ipc, int) or ipc < 1:
        raise ValueError(f"ipc must be a positive int, got {ipc!r}")
    if preset == "full":
        values: Dict[str, Any] = dict(ipc=ipc, iterations=10000, checkpoint_every=500, factor=2, lr_img=None,
                                      mom_img=0.5, batch_real=128, batch_syn_max=200, num_premodel=5, iter_calib=1,
                                      pool=dict(net=dict(width=128, depth=3), amount=20, epochs=60, subset=0),
                                      eval_width=128, eval_epochs=1500, eval_runs=5)
    else:
        values = dict(ipc=ipc, iterations=500, checkpoint_every=100, factor=2, lr_img=0.05 * ipc, mom_img=0.5,
                      batch_real=64, batch_syn_max=200, num_premodel=5, iter_calib=1,
                      pool=dict(net=dict(width=32, depth=3), amount=5, epochs=5, subset=12000),
                      eval_width=32, eval_epochs=300, eval_runs=5)
    for name, value in overrides.items():
        set_path(values, name, value, DANCEConfig)
    return DANCEConfig.from_dict(values)
