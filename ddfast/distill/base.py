"""The common interface of ddfast's distillers.

A distiller (DATM, DANCE, RCIG) takes a :class:`TrainSet` -- the (noisy) training images and labels, plus
what TAD may add: per-sample trust weights, a trusted mask and replacement (pseudo-)labels -- and a config,
and produces a :class:`SyntheticSet`. The loop, checkpointing and exact resume live here, in
:meth:`Distiller.run`; a method implements the hooks ``prepare`` (experts / model pool), ``initialize``
(synthetic images, labels, optimisers), ``step`` (one distillation iteration), ``update_train`` (TAD
swaps the trusted view between rounds), ``synthetic_set`` and ``state_dict``/``load_state_dict``.

Exact resume: every random draw in ``step`` must come from ``self.generator`` (a ``torch.Generator``
checkpointed with the rest of the state), never from the global RNG, so that a run interrupted after a
checkpoint and resumed produces the same synthetic set as an uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch

from ..config import Config, option
from ..hashing import tensor_digest
from ..io import atomic_save_torch, atomic_write_json, load_safetensors, load_torch, save_safetensors

__all__ = ["TrainSet", "SyntheticSet", "Distiller", "DistillConfig", "DistillViews", "peak_memory_bytes", "StageTimer",
           "labels_digest"]


# ----------------------------------------------------------------------------------------------------------
# training set (what the distiller sees)
# ----------------------------------------------------------------------------------------------------------
@dataclass
class TrainSet:
    """The training data a distiller distils, with TAD's optional trust information.

    Attributes:
        images: ``float32 [N, C, H, W]`` in ``[0, 1]`` (raw pixels; the distiller applies its preprocessing).
        labels: ``int64 [N]`` -- the labels as given (noisy).
        num_classes: number of classes ``C``.
        mean, std: per-channel normalisation statistics of the dataset.
        name: dataset name (for presets, caches and reports).
        weights: optional ``float32 [N]`` trust weights in ``[0, 1]``.
        trusted_mask: optional ``bool [N]``; when given, distillation only sees the trusted samples.
        replacement_labels: optional ``int64 [N]``; entries ``>= 0`` replace the given label (TAD's
            pseudo-labels for recalled samples), ``-1`` keeps it.
        transition: optional ``float [C, C]`` estimate of the label noise, ``T[i, j] = P(given label j | true
            class i)`` (rows sum to 1; TAD's ``divert_pool="corrected"``): the networks trained on this set
            (DATM's experts, DANCE's and RCIG's model pools) then use forward loss correction
            (:func:`ddfast.noise.forward_corrected_cross_entropy`; Patrini et al., CVPR 2017).
        soft_labels: optional ``float [N, C]`` distribution of each sample's true class (rows non-negative,
            summing to 1; TAD's ``divert_real="posterior_soft"``: :func:`ddfast.noise.posterior_probabilities`).
            RCIG takes them as the targets of its outer cross-entropy, DANCE draws class ``c``'s real batches with
            probability ``soft_labels[:, c]``; everything else uses the hard labels (``effective_labels``).
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    name: str = "custom"
    weights: Optional[torch.Tensor] = None
    trusted_mask: Optional[torch.Tensor] = None
    replacement_labels: Optional[torch.Tensor] = None
    transition: Optional[torch.Tensor] = None
    soft_labels: Optional[torch.Tensor] = None

    def __post_init__(self):
        if self.images.dim() != 4:
            raise ValueError(f"TrainSet.images must be [N, C, H, W], got shape {tuple(self.images.shape)}")
        n = self.images.shape[0]
        if self.labels.shape != (n,):
            raise ValueError(f"TrainSet.labels must be [{n}], got shape {tuple(self.labels.shape)}")
        if self.labels.dtype != torch.int64:
            raise TypeError(f"TrainSet.labels must be int64, got {self.labels.dtype}")
        if n and (int(self.labels.min()) < 0 or int(self.labels.max()) >= self.num_classes):
            raise ValueError(f"TrainSet.labels must lie in [0, {self.num_classes}), got range "
                             f"[{int(self.labels.min())}, {int(self.labels.max())}]")
        for name in ("weights", "trusted_mask", "replacement_labels"):
            t = getattr(self, name)
            if t is not None and t.shape != (n,):
                raise ValueError(f"TrainSet.{name} must be [{n}], got shape {tuple(t.shape)}")
        if self.trusted_mask is not None and self.trusted_mask.dtype != torch.bool:
            raise TypeError(f"TrainSet.trusted_mask must be bool, got {self.trusted_mask.dtype}")
        if self.replacement_labels is not None:
            r = self.replacement_labels
            if r.dtype != torch.int64 or (r.numel() and (int(r.min()) < -1 or int(r.max()) >= self.num_classes)):
                raise ValueError("TrainSet.replacement_labels must be int64 in [-1, num_classes)")
        if self.transition is not None:
            T, C = self.transition, self.num_classes
            if T.shape != (C, C) or not T.is_floating_point():
                raise ValueError(f"TrainSet.transition must be a float [{C}, {C}] matrix, got {T.dtype} "
                                 f"{tuple(T.shape)}")
            if not bool(torch.isfinite(T).all()) or bool((T < 0).any()) or \
                    not torch.allclose(T.double().sum(1), torch.ones(C, dtype=torch.float64), atol=1e-4):
                raise ValueError("TrainSet.transition must be row-stochastic (finite, >= 0, rows summing to 1)")
        if self.soft_labels is not None:
            q, C = self.soft_labels, self.num_classes
            if q.shape != (n, C) or not q.is_floating_point():
                raise ValueError(f"TrainSet.soft_labels must be a float [{n}, {C}] tensor, got {q.dtype} "
                                 f"{tuple(q.shape)}")
            if n and (not bool(torch.isfinite(q).all()) or bool((q < 0).any()) or
                      not torch.allclose(q.double().sum(1), torch.ones(n, dtype=torch.float64), atol=1e-3)):
                raise ValueError("TrainSet.soft_labels must be class distributions (finite, >= 0, rows summing "
                                 "to 1)")

    @property
    def in_channels(self) -> int:
        return self.images.shape[1]

    @property
    def im_size(self) -> Tuple[int, int]:
        return tuple(self.images.shape[2:])

    def effective_labels(self) -> torch.Tensor:
        """``int64 [N]``: the given labels with TAD's replacement labels applied."""
        if self.replacement_labels is None:
            return self.labels
        return torch.where(self.replacement_labels >= 0, self.replacement_labels, self.labels)

    def effective_indices(self) -> torch.Tensor:
        """``int64 [N']``: indices of the samples distillation may use (the trusted ones, or all)."""
        if self.trusted_mask is None:
            return torch.arange(self.images.shape[0])
        return torch.nonzero(self.trusted_mask, as_tuple=False).flatten()

    def effective(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(images [N', C, H, W], labels int64 [N'], indices int64 [N'])`` of the distillable subset."""
        idx = self.effective_indices()
        return self.images[idx], self.effective_labels()[idx], idx

    def class_indices(self) -> List[torch.Tensor]:
        """Per class ``c``, the indices (into the full set) of distillable samples labelled ``c``."""
        idx = self.effective_indices()
        lab = self.effective_labels()[idx]
        return [idx[lab == c] for c in range(self.num_classes)]

    def check_ipc(self, ipc: int):
        """Raises ``ValueError`` if some class has fewer distillable samples than ``ipc``."""
        if ipc < 1:
            raise ValueError(f"ipc must be >= 1, got {ipc}")
        counts = [int(ix.numel()) for ix in self.class_indices()]
        small = [c for c, k in enumerate(counts) if k < ipc]
        if small:
            raise ValueError(f"ipc={ipc} is larger than the number of (trusted) samples of class(es) "
                             f"{small} (counts {[counts[c] for c in small]})")

    def subset(self, indices: torch.Tensor) -> "TrainSet":
        """A TrainSet restricted to ``indices`` (trust fields sliced alongside)."""
        pick = lambda t: None if t is None else t[indices]  # noqa: E731
        return dataclasses.replace(self, images=self.images[indices], labels=self.labels[indices],
                                   weights=pick(self.weights), trusted_mask=pick(self.trusted_mask),
                                   replacement_labels=pick(self.replacement_labels),
                                   soft_labels=pick(self.soft_labels))


# ----------------------------------------------------------------------------------------------------------
# synthetic set (what the distiller produces)
# ----------------------------------------------------------------------------------------------------------
@dataclass
class SyntheticSet:
    """A distilled set, ready to evaluate, save and show.

    Attributes:
        images: ``float32 [M, C, H, W]`` in the network-input space of the method (normalised, and ZCA-
            whitened when ``preprocess["zca"]`` is set) -- as MTT/DATM/RCIG store them.
        labels: hard ``int64 [M]`` or soft ``float32 [M, num_classes]`` (logits for DATM, learned
            regression targets for RCIG -- see ``eval_config["loss"]``).
        num_classes, ipc, method: what it is.
        lr: the learned step size (DATM) or None.
        preprocess: ``{"mean": [...], "std": [...], "zca": bool}``; ``preprocess_state`` holds the ZCA
            tensors (``zca.*``) so the test set is transformed exactly like the training set.
        eval_config: the method's evaluation protocol (loss, optimiser, epochs, augmentation, model...).
        metadata: free-form JSON-able facts (iterations, config, timings, noise, TAD rounds).
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    ipc: int
    method: str
    lr: Optional[float] = None
    preprocess: Dict[str, Any] = field(default_factory=dict)
    preprocess_state: Dict[str, torch.Tensor] = field(default_factory=dict)
    eval_config: Dict[str, Any] = field(default_factory=dict)
    metadata: Dict[str, Any] = field(default_factory=dict)

    FILE_TENSORS = "synset.safetensors"
    FILE_META = "synset.json"

    @property
    def soft(self) -> bool:
        return self.labels.dim() == 2

    def hard_labels(self) -> torch.Tensor:
        """``int64 [M]``: the argmax of soft labels, or the hard labels."""
        return self.labels.argmax(1) if self.soft else self.labels

    def input_transform(self):
        """The network-input transform the images live in (an :mod:`ddfast.augment` transform; apply it to test
        images, ``.inverse`` it to get pixels back).

        Reads ``preprocess`` / ``preprocess_state``: when ``preprocess["transform"]`` (or ``"kind"``) names a kind
        (``"identity"``, ``"normalize"``, ``"zca"``, ``"compose"``, ...), the transform is rebuilt with
        :func:`ddfast.augment.transform_from_state_dict` from the state tensors (keys optionally prefixed with
        ``"transform."``); otherwise ``Normalize(mean, std)`` (when ``mean``/``std`` are given and
        ``normalize`` is not false) followed by a ZCA from the ``zca.*`` tensors (when ``preprocess["zca"]``).
        The identity when nothing is recorded.

        Raises:
            ValueError: ``zca`` is set but its tensors are missing.
        """
        from ..augment import ZCA, Compose, Identity, Normalize, transform_from_state_dict

        pre, state = dict(self.preprocess or {}), dict(self.preprocess_state or {})
        kind = pre.get("transform") or pre.get("kind")
        if isinstance(kind, str):
            sub = {k[len("transform."):]: v for k, v in state.items() if k.startswith("transform.")}
            return transform_from_state_dict(kind, sub or state)
        parts = []
        if pre.get("mean") is not None and pre.get("std") is not None and pre.get("normalize", True):
            parts.append(Normalize(pre["mean"], pre["std"]))
        if pre.get("zca"):
            zs = {k[len("zca."):]: v for k, v in state.items() if k.startswith("zca.")}
            if not zs:
                raise ValueError("synthetic set says zca=True but holds no zca.* tensors")
            parts.append(ZCA.from_state_dict(zs))
        if not parts:
            return Identity()
        return parts[0] if len(parts) == 1 else Compose(*parts)

    def save(self, directory: str) -> str:
        """Writes ``synset.safetensors`` (images, labels, preprocessing tensors) and ``synset.json``
        (everything else) into ``directory``, atomically. Returns the directory."""
        os.makedirs(directory, exist_ok=True)
        tensors = {"images": self.images, "labels": self.labels}
        for k, v in self.preprocess_state.items():
            tensors[f"preprocess.{k}"] = v
        meta = {
            "format": "ddfast.SyntheticSet/1",
            "num_classes": self.num_classes, "ipc": self.ipc, "method": self.method, "lr": self.lr,
            "preprocess": self.preprocess, "eval_config": self.eval_config, "metadata": self.metadata,
            "label_kind": "soft" if self.soft else "hard",
        }
        # tensors first, metadata last: a directory with a JSON file is a complete one
        save_safetensors(tensors, os.path.join(directory, self.FILE_TENSORS))
        atomic_write_json(meta, os.path.join(directory, self.FILE_META))
        return directory

    @classmethod
    def load(cls, directory: str, device: str | torch.device = "cpu") -> "SyntheticSet":
        """Loads a set written by :meth:`save`. Raises ``FileNotFoundError`` / ``ValueError`` if the
        directory does not hold a complete, well-formed set."""
        meta_path = os.path.join(directory, cls.FILE_META)
        ten_path = os.path.join(directory, cls.FILE_TENSORS)
        if not os.path.exists(meta_path) or not os.path.exists(ten_path):
            raise FileNotFoundError(f"{directory}: no synthetic set ({cls.FILE_META} and {cls.FILE_TENSORS} "
                                    "are written by SyntheticSet.save / `ddfast run`)")
        try:
            with open(meta_path, encoding="utf-8") as f:
                meta = json.load(f)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{meta_path}: corrupt ({' '.join(str(exc).split())}); rerun the distillation or "
                             "restore the file") from None
        if not isinstance(meta, dict) or meta.get("format") != "ddfast.SyntheticSet/1":
            meta = meta if isinstance(meta, dict) else {}
            raise ValueError(f"{meta_path}: not a ddfast synthetic set (format={meta.get('format')!r})")
        tensors = load_safetensors(ten_path, device=device)
        for key in ("images", "labels"):
            if key not in tensors:
                raise ValueError(f"{ten_path}: missing tensor {key!r}")
        images, labels = tensors["images"], tensors["labels"]
        if images.dim() != 4 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"{ten_path}: images {tuple(images.shape)} and labels {tuple(labels.shape)} disagree")
        state = {k[len("preprocess."):]: v for k, v in tensors.items() if k.startswith("preprocess.")}
        missing = [k for k in ("num_classes", "ipc", "method") if k not in meta]
        if missing:
            raise ValueError(f"{meta_path}: missing field(s) {missing}; rerun the distillation or restore the file")
        return cls(images=images, labels=labels, num_classes=meta["num_classes"], ipc=meta["ipc"],
                   method=meta["method"], lr=meta.get("lr"), preprocess=meta.get("preprocess", {}),
                   preprocess_state=state, eval_config=meta.get("eval_config", {}),
                   metadata=meta.get("metadata", {}))


# ----------------------------------------------------------------------------------------------------------
# measurement helpers
# ----------------------------------------------------------------------------------------------------------
def peak_memory_bytes(device: torch.device | str | None = None) -> int:
    """Peak memory so far: CUDA allocator peak for a CUDA device, else the process's peak RSS (bytes)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated(dev))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class StageTimer:
    """Records wall time and peak memory per named stage: ``with timer("distill"): ...``."""

    def __init__(self, device: torch.device | str | None = None):
        self.device = device
        self.stages: Dict[str, Dict[str, float]] = {}

    def __call__(self, name: str):
        timer = self

        class _Stage:
            def __enter__(self_inner):
                dev = torch.device(timer.device) if timer.device is not None else torch.device("cpu")
                if dev.type == "cuda" and torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats(dev)
                self_inner.t0 = time.perf_counter()
                return self_inner

            def __exit__(self_inner, *exc):
                entry = timer.stages.setdefault(name, {"seconds": 0.0, "peak_memory_bytes": 0})
                entry["seconds"] += time.perf_counter() - self_inner.t0
                entry["peak_memory_bytes"] = max(entry["peak_memory_bytes"], peak_memory_bytes(timer.device))
                return False

        return _Stage()


# ----------------------------------------------------------------------------------------------------------
# the distiller
# ----------------------------------------------------------------------------------------------------------
@dataclass
class DistillConfig(Config):
    """Fields every method config has (:class:`ddfast.config.Config`: validated on construction, ``to_dict`` /
    ``from_dict`` / ``replace``). Methods subclass it (as dataclasses) with their own fields.

    Attributes:
        ipc: images per class of the synthetic set (stored images for multi-formation methods).
        iterations: distillation iterations.
        seed: seed of every random draw of the distillation (``Distiller.generator``).
        checkpoint_every: iterations between checkpoints (0: every iteration).
        eval_every: evaluate the synthetic set every this many iterations during distillation (0: never).
    """

    ipc: int = option(10, ge=1)
    iterations: int = option(1000, ge=1)
    seed: int = option(0)
    checkpoint_every: int = option(100, ge=0)
    eval_every: int = option(0, ge=0)

    def check_device(self, device: Union[str, torch.device]) -> None:
        """Raises ``ValueError`` naming the field when a setting cannot run on ``device`` (for example a CUDA-only
        option on a CPU). Distillers call it on construction, ``ddfast run`` before it writes anything. The
        base class accepts every device."""


class Distiller:
    """Base class of DATM, DANCE and RCIG. See the module docstring for the hooks.

    Args:
        config: the method's config dataclass (a :class:`DistillConfig` subclass).
        device: where distillation runs.
        cache_dir: where expensive, reusable artefacts (expert buffers, model pools) are cached, keyed by
            the method's :meth:`cache_key`; ``None`` disables caching.
        quiet: no progress bars.

    Attributes:
        extra_loss: the ``extra_loss`` of the current :meth:`run` call (``None`` outside it): a
            ``callable(images, labels) -> scalar Tensor`` that methods supporting it add to the synthetic-set loss.
    """

    name = "base"
    config_class = DistillConfig
    #: TAD's ``divert_pool="auto"`` diverts this method's networks (experts / pool) to the trusted view only when
    #: the estimated noise rate exceeds ``TADConfig.divert_noise_rate`` (:func:`ddfast.tad.resolve_divert_pool`).
    divert_pool_by_noise_rate = False
    #: Whether the method trains networks (expert trajectories, a model pool) on real images, the part TAD's
    #: ``divert_pool`` controls; ``False`` for RCIG, whose pool trains on the synthetic support set only.
    trains_on_real_images = True

    def __init__(self, config: DistillConfig, *, device: str | torch.device = "cpu",
                 cache_dir: Optional[str] = None, quiet: bool = False):
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config
        self.device = torch.device(device)
        self.cache_dir = cache_dir
        self.quiet = quiet
        self.generator = torch.Generator(device="cpu").manual_seed(int(config.seed))
        self.iteration = 0
        self.history: List[Dict[str, float]] = []
        self.extra_loss: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None
        self.timer = StageTimer(self.device)
        self.train: Optional[TrainSet] = None
        self._prepared_pool: Optional[TrainSet] = None

    # ---- hooks a method implements -----------------------------------------------------------------
    def prepare(self, train: TrainSet) -> None:
        """Builds (or loads from ``cache_dir``) what the method needs besides the synthetic set: expert
        trajectories (DATM), the model pool (DANCE, RCIG). Called once before ``initialize``."""

    def initialize(self, train: TrainSet) -> None:
        """Initialises the synthetic set and the optimisers from ``train``."""
        raise NotImplementedError

    def step(self) -> Dict[str, float]:
        """One distillation iteration; returns scalar metrics (at least ``loss``)."""
        raise NotImplementedError

    def update_train(self, train: TrainSet) -> None:
        """Swaps the real-data view (TAD: a new trusted set and pseudo-labels) keeping the synthetic set."""
        self.train = train

    def synthetic_set(self) -> SyntheticSet:
        """The current synthetic set."""
        raise NotImplementedError

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to resume exactly (synthetic tensors, optimisers, pools); the base adds the
        iteration, history and generator state."""
        raise NotImplementedError

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        raise NotImplementedError

    def cache_key(self, train: TrainSet) -> Dict[str, Any]:
        """What the cached artefacts depend on (dataset, labels digest, config fields)."""
        return {"method": self.name, "dataset": train.name, "labels": labels_digest(train)}

    # ---- the loop -----------------------------------------------------------------------------------
    def full_state(self) -> Dict[str, Any]:
        return {"method": self.name, "iteration": self.iteration, "history": self.history,
                "generator": self.generator.get_state(), "config": self.config.to_dict(),
                "method_state": self.state_dict()}

    def load_full_state(self, state: Dict[str, Any]) -> None:
        if state.get("method") != self.name:
            raise ValueError(f"checkpoint is for method {state.get('method')!r}, not {self.name!r}")
        if state.get("config") != self.config.to_dict():
            diff = {k: (v, self.config.to_dict().get(k)) for k, v in state.get("config", {}).items()
                    if self.config.to_dict().get(k) != v}
            raise ValueError(f"checkpoint was written with another config (differences: {diff}); "
                             "use a new output directory or the same options")
        self.iteration = int(state["iteration"])
        self.history = list(state["history"])
        self.generator.set_state(state["generator"])
        self.load_state_dict(state["method_state"])

    def save_checkpoint(self, path: str) -> None:
        atomic_save_torch(self.full_state(), path)

    def run(self, train: TrainSet, iterations: Optional[int] = None, *, views: Optional["DistillViews"] = None,
            extra_loss: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
            checkpoint_dir: Optional[str] = None, resume: bool = True,
            callback: Optional[Callable[["Distiller", Dict[str, float]], None]] = None,
            initialize: bool = True, until: Optional[int] = None) -> SyntheticSet:
        """Prepares, initialises (or resumes) and runs ``iterations`` distillation steps (the config's when None).

        Args:
            train: the real data the distillation steps draw from.
            iterations: steps to run (default ``config.iterations``); ``until`` overrides the target with an
                absolute iteration count.
            views: what the other parts see (:class:`DistillViews`, TAD's diversion): ``prepare`` (experts /
                pool) sees ``views.pool`` -- once per distiller and pool view --, ``initialize`` sees
                ``views.init``, and the real view ``train`` is installed with :meth:`update_train` around them.
                None: every part sees ``train``.
            extra_loss: ``callable(images, labels) -> scalar Tensor`` added to the synthetic-set loss for the
                duration of the call by methods that support it (TAD's consistency regularisation).
            checkpoint_dir: ``checkpoint_dir/checkpoint.pt`` is written (atomically) every
                ``config.checkpoint_every`` iterations and at the end; with ``resume`` and an existing
                checkpoint the run continues from it and ends in the same state as an uninterrupted run.
            initialize: ``False`` keeps the current synthetic set (TAD's later rounds) and runs ``iterations``
                more.
            callback: ``callback(distiller, metrics)`` after every step.

        Returns:
            The synthetic set.
        """
        total = int(self.config.iterations if iterations is None else iterations)
        if until is None:
            until = total if initialize else self.iteration + total
        self.train = train
        self.extra_loss = extra_loss
        try:
            ckpt = os.path.join(checkpoint_dir, "checkpoint.pt") if checkpoint_dir else None
            with self.timer("prepare"):
                self._prepare_views(train, views)
            if ckpt and resume and os.path.exists(ckpt):
                with self.timer("initialize"):
                    if initialize:
                        self._initialize_views(train, views)  # optimisers/shapes that the state then overwrites
                    self.load_full_state(load_torch(ckpt))
                if not self.quiet:
                    print(f"{self.name}: resumed from {ckpt} at iteration {self.iteration}")
            elif initialize:
                with self.timer("initialize"):
                    self._initialize_views(train, views)
                    self.iteration = 0
            self._loop(max(self.iteration, int(until)), ckpt, callback)
        finally:
            self.extra_loss = None
        return self.synthetic_set()

    def _prepare_views(self, train: TrainSet, views: Optional["DistillViews"]) -> None:
        if views is None:
            self.prepare(train)
            return
        pool = views.pool if views.pool is not None else train
        if self._prepared_pool is not pool:
            self.prepare(pool)
            self._prepared_pool = pool
        self.update_train(train)

    def _initialize_views(self, train: TrainSet, views: Optional["DistillViews"]) -> None:
        if views is None:
            self.initialize(train)
            return
        init = views.init if views.init is not None else train
        self.update_train(init)
        self.initialize(init)
        self.update_train(train)

    def _loop(self, end_it: int, ckpt: Optional[str], callback) -> None:
        from tqdm.auto import tqdm

        bar = tqdm(total=end_it - self.iteration, desc=f"{self.name} distill", disable=self.quiet, leave=False,
                   dynamic_ncols=True)
        with self.timer("distill"):
            while self.iteration < end_it:
                metrics = self.step()
                for k, v in metrics.items():
                    if isinstance(v, float) and not math.isfinite(v):
                        raise FloatingPointError(f"{self.name}: non-finite {k}={v} at iteration {self.iteration}")
                self.iteration += 1
                metrics = {"iteration": self.iteration, **metrics}
                self.history.append(metrics)
                bar.update(1)
                if "loss" in metrics:
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}")
                if callback is not None:
                    callback(self, metrics)
                if ckpt and (self.iteration % max(1, self.config.checkpoint_every) == 0 or self.iteration == end_it):
                    self.save_checkpoint(ckpt)
        bar.close()


@dataclass(frozen=True)
class DistillViews:
    """What the parts of a distiller see besides the real data of the steps (TAD's diversion):

    Attributes:
        pool: the :class:`TrainSet` that :meth:`Distiller.prepare` builds the expert trajectories (DATM) or the
            model pool (DANCE, RCIG) from; ``None`` = the real view. Prepared once per distiller and view
            object: pass the same object to later ``run`` calls to keep the experts / pool.
        init: the :class:`TrainSet` the synthetic images (and labels) are initialised from; ``None`` = the real
            view.
    """

    pool: Optional[TrainSet] = None
    init: Optional[TrainSet] = None


def labels_digest(train: TrainSet) -> str:
    """A short content hash of the labels, trust mask, replacement labels and (when set) the noise transition
    of forward correction and the soft labels (cache keys)."""
    parts = [train.labels, train.trusted_mask, train.replacement_labels, torch.tensor(list(train.images.shape))]
    if train.transition is not None:
        parts.append(train.transition.double())
    if train.soft_labels is not None:
        parts.append(train.soft_labels.double())
    return tensor_digest(*parts, with_meta=True)
