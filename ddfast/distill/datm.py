"""DATM: difficulty-aligned trajectory matching (Guo, Wang, Cazenavette, Li, Zhang, You; ICLR 2024), with MTT's
loss (Cazenavette et al., CVPR 2022) and TESLA's constant-memory gradient (Cui et al., ICML 2023).

What one distillation iteration computes (Guo et al., ICLR 2024, §3; the official ``distill/DATM.py``):

1. Take the next expert trajectory (experts visited in a random order, reshuffled after each pass) and a start
   epoch ``t ~ U{min_start_epoch, ..., upper - 1}`` with the *difficulty-aligned window*
   ``upper = min(max_start_epoch, current_max_start_epoch
   + floor((max_start_epoch - current_max_start_epoch) * it / expansion_end_epoch))`` when
   ``sequential_generation`` (else ``upper = max_start_epoch``).
2. Start the student at ``theta_0 = theta*_t`` and take ``N = syn_steps`` SGD steps with the learnable step size
   ``alpha``: ``theta_{i+1} = theta_i - alpha * grad_theta l(f(A_i(X_{b_i}); theta_i), Y_{b_i})`` where ``b_i`` are
   mini-batches of ``batch_syn`` synthetic images (consecutive chunks of a random permutation, refilled when used
   up), ``A_i`` is DSA with a seed drawn per step, and ``l`` is the soft cross entropy
   ``mean_b sum_k -softmax(Y_b)_k log softmax(z_b)_k`` against the learnable label logits ``Y``.
3. ``L = ||theta_N - theta*_{t+M}||^2 / ||theta_0 - theta*_{t+M}||^2`` (MTT eq. 2;
   :func:`ddfast.ops.trajectory_matching_loss`), ``M = expert_epochs``.
4. Gradients w.r.t. the images ``X``, the labels ``Y`` and ``alpha``; the three SGD optimisers (images: ``lr_img``,
   momentum 0.5; ``alpha``: ``lr_lr``, momentum 0.5; labels: ``lr_y``, momentum ``momentum_y`` = 0.9) step only if
   ``L <= threshold`` -- otherwise the iteration is a *fault* (counted, nothing updated).

Gradient modes (``grad_mode``):

- ``"unroll"`` -- MTT/DATM's full back-propagation through the ``N`` unrolled steps (``create_graph=True`` at
  every step; memory grows linearly in ``N * batch_syn``).
- ``"tesla"`` -- TESLA's two passes (Cui et al., ICML 2023, §4; ``distill/DATM_tesla.py``). Pass 1 unrolls with detached gradients, keeping each
  step's parameters ``theta_i``, batch indices and DSA seed and the sum ``G = sum_i g_i``. With
  ``v = dL/dG = 2 [alpha (theta* - theta_0) + alpha^2 G] / D`` (:func:`ddfast.ops.tesla_quantities`), pass 2
  recomputes each ``g_i`` with ``create_graph=True`` (same batch, same DSA seed) and back-propagates the scalar
  ``s_i = v . g_i`` into ``X`` and ``Y``; ``dL/dalpha = -2 G . (theta_0 - alpha G - theta*) / D``. Only one
  step's graph is alive at a time: activation memory does not grow with ``N`` (the ``N`` parameter vectors,
  ``N * P`` floats, are kept).

  *What TESLA drops* (derivation). Write ``u = dL/dtheta_N`` and ``H_j = d g_j / d theta_j`` (the Hessian of the
  inner loss at step ``j``). The exact gradient is
  ``dL/dX = sum_i (v_i^exact)^T dg_i/dX|_theta_i`` with ``v_i^exact = -alpha (prod_{j>i} (I - alpha H_j))^T u``, and
  ``dL/dalpha = -u . sum_i prod_{j>i}(I - alpha H_j) g_i``. TESLA uses ``v_i = -alpha u = v`` for every ``i``
  and ``dL/dalpha = -u . G``: it sets every later-step Jacobian ``dtheta_{j+1}/dtheta_j = I - alpha H_j`` to
  the identity, i.e. drops all cross-step terms ``dg_j/dtheta_j . dtheta_j/dX_i`` (``j > i``) and
  ``dg_j/dtheta_j . dtheta_j/dalpha``. It is exact for the last step and hence for ``syn_steps = 1``; for
  ``N = 2`` the dropped image/label term is ``-alpha (H_1 v) . dg_0/dX`` and the dropped lr term is
  ``-(H_1 v) . g_0`` -- both checked to float64 precision in ``tests/test_distill_datm.py``; the error is
  ``O(alpha^2)`` relative to the ``O(alpha)`` gradient.

CUDA graph (``cuda_graph=True``, ``grad_mode="unroll"``, CUDA only): the iteration's unroll, loss and backward
are recorded once as a ``torch.cuda.CUDAGraph`` over static buffers (expert segment, batch indices, DSA uniforms
and, in DSA mode ``'S'``, the chosen group as a one-hot weight: :meth:`ddfast.augment.DSA.apply_weighted` runs
every group and keeps the chosen one, so the kernel sequence no longer depends on the draw) and replayed every
iteration with the same random draws as the eager loop. At these sizes the eager loop is bound by the host's
kernel launches; replaying the same iteration as one graph measured 2.7-5.7x faster on an H200
(``benchmarks/bench_cuda_graph.py``). The static iteration is the eager one term for term (tested on the CPU by
running it without capture); every group's DSA ops run, so DSA costs up to ``len(groups)`` times more.

Data flow and noise (TAD, :mod:`ddfast.tad`): the experts train on ``TrainSet.effective()`` (the trusted
samples with replacement labels), and the synthetic images and their soft labels are initialised from that
subset only. The input transform (ZCA, fit with no labels) is fitted once on all training images. Everything is
in network-input space: the synthetic images are stored after the transform, as MTT/DATM store them.

Randomness: every draw during initialisation and distillation comes from ``self.generator`` (checkpointed),
the experts from ``expert_seed`` (:mod:`ddfast.distill.experts`), so a resumed run equals an uninterrupted one.

Trajectory parallelism under ``torchrun`` (:mod:`ddfast.distributed`, ``W > 1`` processes). Every rank holds the
whole synthetic set (broadcast from rank 0 after initialisation) and the same ``self.generator``. Each iteration
draws ``W`` segments from it -- the next ``W`` experts of the shuffled order and ``W`` start epochs -- and one
shared plan (batches, DSA seeds); rank ``r`` unrolls segment ``r``. Since every rank draws the same numbers, the
generator, the expert order and the checkpoints stay identical on all ranks and resume stays exact; with
``W = 1`` the draws are exactly the single-process ones. The gate is applied per segment: with ``L_r`` rank
``r``'s matching loss and ``S = {r : L_r <= threshold}``, the images, labels and lr step with the gradient
``(1 / |S|) sum_{r in S} grad_r`` (``grad_r`` includes ``extra_loss``'s gradient, the same on every rank),
obtained with one :func:`ddfast.distributed.all_reduce_mean_` of the rank-scaled gradients; ``S`` empty is a
fault (nothing updated). The reported ``loss`` and ``start_epoch`` are means over the ranks. The expert buffer is
built sharded over the ranks (:func:`ddfast.distill.experts.train_experts`).
"""
from __future__ import annotations

import copy
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .. import distributed as dd
from ..augment import DSA, build_input_transform, transform_from_state_dict
from ..config import option, set_path
from ..data import canonical_name
from ..hashing import digest, tensor_digest
from ..io import load_safetensors, quarantine, save_safetensors
from ..models import functional_forward
from ..ops import tesla_quantities, trajectory_matching_loss
from .base import DistillConfig, Distiller, SyntheticSet, TrainSet
from .experts import ExpertBuffer, ExpertRecipe, buffer_directory, train_experts

__all__ = ["DATM", "DATMConfig", "preset_config", "PRESET_DOCS", "soft_cross_entropy"]

logger = logging.getLogger("ddfast.distill.datm")

_PIX_INITS = ("samples_predicted_correctly", "real", "noise")
_LABEL_INITS = ("correct_experts", "first_expert", "hard")
_PREPROCESS = ("none", "normalize", "zca", "normalize+zca")


@dataclass
class DATMConfig(DistillConfig):
    """DATM's options (defaults: the official code's ``utils/cfg.py`` and CIFAR-10 IPC10 config).

    Network and input:
        preprocess: network-input transform, ``"zca"`` (DATM: ZCA on the raw [0, 1] pixels, kornia eps 0.1),
            ``"normalize+zca"``, ``"normalize"`` or ``"none"``; zca_eps: ZCA regulariser (0.1).
        dsa, dsa_strategy: DSA in experts, distillation and evaluation.

    Expert buffer ``expert`` (:class:`ddfast.distill.experts.ExpertRecipe`, a nested config): ``net`` (the
    ConvNet of experts *and* student: ConvNet-3, width 128, instance norm), ``num_experts`` (100), ``epochs``
    (``train_epochs``, 100 in DATM's README), ``lr`` (``lr_teacher``, 0.01, also alpha's initial value),
    ``momentum`` (0), ``weight_decay`` (0), ``batch_size`` (256), ``optimizer`` (``"gsam"``: FTD/DATM;
    ``"sgd"``: MTT), ``gsam_rho`` (0.01), ``gsam_alpha`` (0.3), ``gsam_adaptive`` (True), ``subset_per_class``
    (0 = all), ``seed`` (0), ``parallel`` (0 = all), ``vmap`` (``"auto"``). Set with ``expert={"epochs": 6}`` or
    ``-O distill.expert.epochs=6``.

    Distillation:
        syn_steps (N, 80), expert_epochs (M, 2), batch_syn (0 = all ``ipc * C`` images), lr_img (100),
        lr_lr (1e-5), lr_y (2), momentum_y (0.9), lr_init (``None`` = ``expert.lr``), threshold (1.0),
        min_start_epoch (0), current_max_start_epoch (10), max_start_epoch (20), expansion_end_epoch (1000),
        sequential_generation (True), pix_init (``"samples_predicted_correctly"``, ``"real"``, ``"noise"``),
        label_init (``"correct_experts"``: average logits of the experts that classify the image correctly;
        ``"first_expert"``: expert 0's logits (DATM's ``pix_init='real'`` branch); ``"hard"``: fixed hard labels
        and plain cross entropy, MTT), label_model_timestamp (snapshot used for the initialisation, -1 = last),
        grad_mode (``"unroll"`` or ``"tesla"``), cuda_graph (``False``; ``True``: replay the unrolled iteration
        as one CUDA graph, module docstring -- needs ``grad_mode="unroll"``, a CUDA device and ``batch_syn``
        dividing ``ipc * C``).

    Evaluation protocol written into ``SyntheticSet.eval_config``:
        eval_epochs (1000), eval_batch (128), eval_runs (5).

    Raises:
        ValueError: a bad value, naming the field (checked on construction).
    """

    iterations: int = option(10000, ge=1)
    preprocess: str = option("zca", choices=_PREPROCESS)
    zca_eps: float = option(0.1, gt=0)
    dsa: bool = option(True)
    dsa_strategy: str = option("color_crop_cutout_flip_scale_rotate")
    # expert buffer
    expert: ExpertRecipe = option(factory=lambda: ExpertRecipe(epochs=100))
    # distillation
    syn_steps: int = option(80, ge=1)
    expert_epochs: int = option(2, ge=1)
    batch_syn: int = option(0, ge=0)
    lr_img: float = option(100.0, ge=0)
    lr_lr: float = option(1e-5, ge=0)
    lr_y: float = option(2.0, ge=0)
    momentum_y: float = option(0.9, ge=0, lt=1)
    lr_init: Optional[float] = option(None, gt=0)
    threshold: float = option(1.0, gt=0)
    min_start_epoch: int = option(0, ge=0)
    current_max_start_epoch: int = option(10)
    max_start_epoch: int = option(20)
    expansion_end_epoch: int = option(1000, ge=1)
    sequential_generation: bool = option(True)
    pix_init: str = option("samples_predicted_correctly", choices=_PIX_INITS)
    label_init: str = option("correct_experts", choices=_LABEL_INITS)
    label_model_timestamp: int = option(-1)
    grad_mode: str = option("unroll", choices=("unroll", "tesla"))
    cuda_graph: bool = option(False)
    # evaluation protocol
    eval_epochs: int = option(1000, ge=1)
    eval_batch: int = option(128, ge=1)
    eval_runs: int = option(5, ge=1)

    def check(self) -> None:
        try:
            DSA(self.dsa_strategy)
        except (ValueError, TypeError) as exc:
            self.fail("dsa_strategy", str(exc))
        # the difficulty-aligned window must fit into the trajectories
        if self.max_start_epoch <= self.min_start_epoch:
            self.fail("max_start_epoch", f"({self.max_start_epoch}) must be > min_start_epoch ({self.min_start_epoch})")
        if self.sequential_generation and not (self.min_start_epoch < self.current_max_start_epoch
                                               <= self.max_start_epoch):
            self.fail("current_max_start_epoch", f"({self.current_max_start_epoch}) must lie in (min_start_epoch, "
                      f"max_start_epoch] = ({self.min_start_epoch}, {self.max_start_epoch}]")
        epochs = self.expert.epochs
        if self.max_start_epoch - 1 + self.expert_epochs > epochs:
            self.fail("expert.epochs", f"({epochs}) is too small for max_start_epoch ({self.max_start_epoch}, "
                      f"exclusive) + expert_epochs ({self.expert_epochs}): the last target snapshot would be epoch "
                      f"{self.max_start_epoch - 1 + self.expert_epochs}")
        if self.cuda_graph and self.grad_mode != "unroll":
            self.fail("cuda_graph", f"is implemented for grad_mode='unroll', got grad_mode={self.grad_mode!r}")
        if not -(epochs + 1) <= self.label_model_timestamp <= epochs:
            self.fail("label_model_timestamp", f"{self.label_model_timestamp} is outside the {epochs + 1} snapshots")

    def check_device(self, device) -> None:
        if self.cuda_graph and torch.device(device).type != "cuda":
            self.fail("cuda_graph", f"needs a CUDA device, got device {str(device)!r}")

    @property
    def net(self):
        """The experts' and the student's network (``expert.net``)."""
        return self.expert.net


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """DATM's student loss: ``mean_b sum_k -softmax(targets_b)_k * log_softmax(logits_b)_k`` for float label
    logits ``targets [B, C]`` (temperature 1); plain cross entropy for int64 ``targets [B]``. Returns a scalar."""
    if targets.is_floating_point():
        return -(torch.softmax(targets, dim=-1) * torch.log_softmax(logits, dim=-1)).sum(-1).mean()
    return F.cross_entropy(logits, targets)


def _digest(*tensors: Optional[torch.Tensor]) -> str:
    return tensor_digest(*tensors, with_meta=True, n=32)


class _UnrollGraph:
    """DATM's unrolled iteration (:meth:`DATM._unroll`) over static buffers, optionally captured as a CUDA graph.

    Buffers (on the distiller's device): ``theta0`` and ``target`` ``[P]``, ``idx`` ``int64 [syn_steps, batch]``,
    with DSA ``u`` ``[syn_steps, batch, 11]`` (the uniforms :meth:`DSA.sample` draws for each step's seed) and,
    in mode ``'S'``, ``w`` ``[syn_steps, len(groups)]`` (:meth:`DSA.group_weights`). :meth:`fill` copies one
    iteration's draws into them, :meth:`run` is the iteration itself with no host synchronisation (returns the
    loss and the gradients of the learnables and the lr), :meth:`capture` records :meth:`run` as a CUDA graph and
    :meth:`replay` runs it.
    """

    def __init__(self, d: "DATM", batch: int, num_params: int):
        cfg, dev = d.config, d.device
        self.d = d
        self.theta0 = torch.zeros(num_params, device=dev)
        self.target = torch.zeros(num_params, device=dev)
        self.idx = torch.zeros(cfg.syn_steps, batch, dtype=torch.long, device=dev)
        dsa = d._dsa
        self.u = torch.zeros(cfg.syn_steps, batch, 11, device=dev) if dsa is not None else None
        self.w = (torch.zeros(cfg.syn_steps, len(dsa.groups), device=dev)
                  if dsa is not None and dsa.mode == "S" else None)
        self.graph = None
        self.out: Optional[Tuple[torch.Tensor, ...]] = None

    def fill(self, theta0: torch.Tensor, target: torch.Tensor, plan) -> None:
        self.theta0.copy_(theta0)
        self.target.copy_(target)
        self.idx.copy_(torch.stack([idx for idx, _ in plan]))
        dsa = self.d._dsa
        if dsa is not None:
            params = [dsa.sample(idx.numel(), seed) for idx, seed in plan]
            self.u.copy_(torch.stack([p.uniforms for p in params]))
            if self.w is not None:
                self.w.copy_(torch.stack([dsa.group_weights(p) for p in params]))

    def run(self) -> Tuple[torch.Tensor, ...]:
        from ..augment import DSAParams

        d = self.d
        dsa = d._dsa
        cur = self.theta0.clone().requires_grad_(True)
        for s in range(self.idx.shape[0]):
            idx = self.idx[s]
            x = d.image_syn[idx]
            if self.w is not None:
                x = dsa.apply_weighted(x, self.u[s], self.w[s])
            elif dsa is not None:
                x = dsa.apply(x, DSAParams(dsa.groups, self.u[s]))
            (g,) = torch.autograd.grad(d._inner_loss(cur, x, d.label_syn[idx]), cur, create_graph=True)
            cur = cur - d.syn_lr * g
        loss = trajectory_matching_loss(cur, self.theta0, self.target, check_finite=False)
        return (loss.detach(),) + tuple(torch.autograd.grad(loss, d._learnables() + [d.syn_lr]))

    def capture(self, warmup: int = 2) -> None:
        """Warm-up on a side stream (cuDNN's algorithm search, the allocator), then one capture (the recipe of
        PyTorch's "CUDA Graphs" notes)."""
        side = torch.cuda.Stream(self.d.device)
        side.wait_stream(torch.cuda.current_stream(self.d.device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self.run()
        torch.cuda.current_stream(self.d.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self.run()

    def replay(self) -> Tuple[torch.Tensor, ...]:
        self.graph.replay()
        return self.out


class DATM(Distiller):
    """DATM distiller (module docstring). ``DATM(config, device=..., cache_dir=..., quiet=...)``.

    Attributes after :meth:`prepare`: ``transform`` (the network-input transform), ``experts``
    (:class:`ExpertBuffer`). After :meth:`initialize`: ``image_syn float32 [ipc*C, C_in, H, W]`` (network-input
    space, learnable), ``label_syn`` (``float32 [ipc*C, C]`` logits, learnable, or ``int64 [ipc*C]`` with
    ``label_init="hard"``), ``syn_lr`` (0-d, learnable), ``faults`` (iterations skipped by the gate).

    ``extra_loss(images, labels)`` (TAD's consistency term) receives ``image_syn`` (network-input space) and
    ``label_syn``; its gradient is added to the images' and labels' (not the lr's). The gate looks at the matching
    loss only.
    """

    name = "datm"
    config_class = DATMConfig
    # the synthetic set learns what the expert trajectories cover: experts on the trusted view lose the
    # hard-but-clean images, which costs more than the noise they avoid until most labels are wrong
    divert_pool_by_noise_rate = True

    def __init__(self, config: DATMConfig, *, device: Union[str, torch.device] = "cpu",
                 cache_dir: Optional[str] = None, quiet: bool = False):
        super().__init__(config, device=device, cache_dir=cache_dir, quiet=quiet)
        self.transform = None
        self.experts: Optional[ExpertBuffer] = None
        self.experts_key: Optional[str] = None
        self._rebuild_experts = False
        self._x_all: Optional[torch.Tensor] = None
        self._x_src: Optional[int] = None
        self._template = None
        self._dsa = DSA(config.dsa_strategy) if config.dsa else None
        self._graph: Optional[_UnrollGraph] = None
        config.check_device(self.device)
        self.image_syn: Optional[torch.Tensor] = None
        self.label_syn: Optional[torch.Tensor] = None
        self.syn_lr: Optional[torch.Tensor] = None
        self.faults = 0
        self._order: List[int] = []
        self._pos = 0
        self.init_info: Dict[str, Any] = {}

    # ---------------------------------------------------------------------------------------------------
    def _log(self, msg: str) -> None:
        logger.info(msg)
        if not self.quiet:
            print(f"datm: {msg}", flush=True)

    def _warn(self, msg: str) -> None:
        logger.warning(msg)
        warnings.warn(f"DATM: {msg}", RuntimeWarning, stacklevel=3)

    def cache_key(self, train: TrainSet) -> Dict[str, Any]:
        """What the expert buffer depends on: the dataset name, a digest of all images, of the labels as given
        (noise), of the trusted subset and the labels the experts see (trusted mask + replacement labels), the
        input transform, the expert recipe and, when given, the noise transition of forward correction."""
        cfg = self.config
        idx = train.effective_indices()
        key = {"method": self.name, "dataset": train.name, "num_classes": int(train.num_classes),
               "images": _digest(train.images), "labels": _digest(train.labels),
               "trusted": _digest(idx, train.effective_labels()[idx]),
               "preprocess": cfg.preprocess, "zca_eps": cfg.zca_eps, "recipe": cfg.expert.key(),
               "dsa_strategy": cfg.dsa_strategy if cfg.dsa else None}
        if train.transition is not None:  # forward-corrected experts (TAD's divert_pool="corrected")
            key["transition"] = _digest(train.transition.double())
        return key

    # ---- prepare: transform + experts -------------------------------------------------------------------
    def _fit_transform(self, train: TrainSet):
        cfg = self.config
        kind = cfg.preprocess
        if kind == "none":
            return build_input_transform("none")
        path = None
        if self.cache_dir is not None:
            key = {"images": _digest(train.images), "kind": kind, "eps": cfg.zca_eps, "mean": list(train.mean),
                   "std": list(train.std)}
            h = digest(key)
            path = os.path.join(self.cache_dir, "datm_transforms", f"{h}.safetensors")
            if os.path.exists(path):
                from safetensors import safe_open

                try:
                    with safe_open(path, framework="pt") as f:
                        tkind = (f.metadata() or {})["kind"]
                    return transform_from_state_dict(tkind, load_safetensors(path))
                except Exception as exc:  # noqa: BLE001 - any corrupt entry: set it aside and rebuild
                    moved = quarantine(path)
                    self._warn(f"the cached input transform {path} is corrupt ({type(exc).__name__}); moved to "
                               f"{moved}, fitting it again")
        t0 = time.perf_counter()
        tr = build_input_transform(kind, train.images, mean=train.mean, std=train.std, eps=cfg.zca_eps)
        self._log(f"fitted the {kind} input transform in {time.perf_counter() - t0:.1f} s")
        if path is not None:
            save_safetensors(tr.state_dict(), path, metadata={"kind": tr.kind})
        return tr

    def _transform_all(self, images: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
        out = torch.empty(images.shape, dtype=torch.float32, device=self.device)
        with torch.no_grad():
            for i in range(0, images.shape[0], chunk):
                out[i:i + chunk] = self.transform(images[i:i + chunk].to(self.device, torch.float32))
        return out

    def prepare(self, train: TrainSet) -> None:
        """Fits the input transform (once), transforms the training images, and builds or loads the expert
        buffer on the trusted view of ``train`` (kept on later calls unless :meth:`update_train` asked for a
        rebuild)."""
        cfg = self.config
        self.train = train
        if self.transform is None:
            self.transform = self._fit_transform(train)
            if hasattr(self.transform, "to"):
                self.transform.to(self.device)
        if self._x_all is None or self._x_src != id(train.images):
            self._x_all = self._transform_all(train.images)
            self._x_src = id(train.images)
        if self._template is None:
            self._template = cfg.net.build(train.in_channels, train.num_classes, train.im_size, seed=0).to(self.device)
            self._template.train()
        if self.experts is None or self._rebuild_experts:
            key = self.cache_key(train)
            directory = buffer_directory(self.cache_dir, key) if self.cache_dir is not None else None
            idx = train.effective_indices()
            labels = train.effective_labels()[idx]
            self._log(f"expert buffer: {cfg.expert.num_experts} experts x {cfg.expert.epochs} epochs "
                      f"({cfg.expert.optimizer}) on {idx.numel()} samples"
                      + (f" -> {directory}" if directory else " (in memory)"))
            t0 = time.perf_counter()
            with self.timer("experts"):
                self.experts = train_experts(cfg.expert, self._x_all[idx.to(self.device)], labels,
                                             train.num_classes, dsa_strategy=cfg.dsa_strategy if cfg.dsa else None,
                                             directory=directory, key=key, device=self.device,
                                             log=None if self.quiet else (lambda s: print(f"datm: {s}", flush=True)),
                                             transition=train.transition)
            self.experts_key = digest(key)
            self._log(f"expert buffer ready in {time.perf_counter() - t0:.1f} s: {self.experts}")
            self._rebuild_experts = False

    def update_train(self, train: TrainSet, rebuild_experts: bool = False) -> None:
        """Swaps the real-data view (TAD's new trusted set). DATM uses real images only to initialise, so the
        synthetic set and the experts are kept; ``rebuild_experts=True`` retrains (or loads from the cache) the
        experts on the new trusted set before the next iteration."""
        self.train = train
        if rebuild_experts:
            self._rebuild_experts = True
            self.prepare(train)

    # ---- initialisation ------------------------------------------------------------------------------------
    def _logits(self, flat: torch.Tensor, x: torch.Tensor, chunk: int = 512) -> torch.Tensor:
        outs = []
        with torch.no_grad():
            for i in range(0, x.shape[0], chunk):
                outs.append(functional_forward(self._template, flat.to(self.device), x[i:i + chunk]))
        return torch.cat(outs)

    def _init_indices(self, train: TrainSet) -> torch.Tensor:
        """Indices (into the full training set) of the ``ipc`` real images per class used as initialisation."""
        cfg = self.config
        g = self.generator
        classes = train.class_indices()
        chosen_all = []
        self.init_info["fallback_classes"] = []
        self.init_info["experts_used"] = []
        ts = cfg.label_model_timestamp
        for c, idx in enumerate(classes):
            cand = idx[torch.randperm(idx.numel(), generator=g)]
            if cfg.pix_init == "real":
                chosen_all.append(cand[:cfg.ipc])
                continue
            taken: List[int] = []
            taken_set = set()
            used = 0
            for e in range(self.experts.num_experts):
                used = e + 1
                w = self.experts.snapshot(e, ts)
                for s in range(0, cand.numel(), 256):
                    part = cand[s:s + 256]
                    pred = self._logits(w, self._x_all[part.to(self.device)]).argmax(1).cpu()
                    for j in torch.nonzero(pred == c, as_tuple=False).flatten().tolist():
                        i = int(part[j])
                        if i not in taken_set:
                            taken.append(i)
                            taken_set.add(i)
                            if len(taken) == cfg.ipc:
                                break
                    if len(taken) == cfg.ipc:
                        break
                if len(taken) == cfg.ipc:
                    break
            self.init_info["experts_used"].append(used)
            if len(taken) < cfg.ipc:
                rest = [int(i) for i in cand.tolist() if int(i) not in taken_set]
                need = cfg.ipc - len(taken)
                self._warn(f"class {c}: only {len(taken)} of the {idx.numel()} (trusted) samples are classified "
                           f"correctly by any of the {self.experts.num_experts} experts; filling {need} slot(s) "
                           "with random real samples of the class")
                self.init_info["fallback_classes"].append(c)
                taken += rest[:need]
            chosen_all.append(torch.tensor(taken, dtype=torch.long))
        return torch.cat(chosen_all)

    def _init_labels(self, hard: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        ts = cfg.label_model_timestamp
        x = self.image_syn.detach()
        if cfg.label_init == "first_expert":
            return self._logits(self.experts.snapshot(0, ts), x).float()
        total = torch.zeros(x.shape[0], self.train.num_classes, device=self.device)
        count = torch.zeros(x.shape[0], device=self.device)
        mean_all = torch.zeros_like(total)
        for e in range(self.experts.num_experts):
            z = self._logits(self.experts.snapshot(e, ts), x)
            ok = (z.argmax(1) == hard).float()
            total += z * ok[:, None]
            count += ok
            mean_all += z / self.experts.num_experts
        none = count == 0
        if none.any():
            self._warn(f"{int(none.sum())} initial image(s) are classified correctly by no expert; their soft "
                       "labels are the mean logits of all experts")
        self.init_info["label_init_correct_experts_mean"] = float(count.mean()) / self.experts.num_experts
        return torch.where(none[:, None], mean_all, total / count.clamp_min(1)[:, None])

    def initialize(self, train: TrainSet) -> None:
        """Initial synthetic images, labels, learnable lr and the three optimisers (module docstring)."""
        cfg = self.config
        if self.experts is None:
            self.prepare(train)
        train.check_ipc(cfg.ipc)
        C = train.num_classes
        hard = torch.arange(C, device=self.device).repeat_interleave(cfg.ipc)
        self.init_info = {}
        if cfg.pix_init == "noise":
            img = torch.randn((C * cfg.ipc,) + tuple(self._x_all.shape[1:]), generator=self.generator)
            self.init_info["indices"] = []
        else:
            idx = self._init_indices(train)
            img = self._x_all[idx.to(self.device)].clone()
            self.init_info["indices"] = idx.tolist()
        self.image_syn = img.detach().to(self.device, torch.float32).requires_grad_(True)
        if cfg.label_init == "hard":
            self.label_syn = hard.clone()
        else:
            lab = self._init_labels(hard)
            self.init_info["label_argmax_agreement"] = float((lab.argmax(1) == hard).float().mean())
            self.label_syn = lab.detach().clone().requires_grad_(True)
        lr0 = cfg.expert.lr if cfg.lr_init is None else cfg.lr_init
        self.syn_lr = torch.tensor(float(lr0), device=self.device).requires_grad_(True)
        self.opt_img = torch.optim.SGD([self.image_syn], lr=cfg.lr_img, momentum=0.5)
        self.opt_lr = torch.optim.SGD([self.syn_lr], lr=cfg.lr_lr, momentum=0.5)
        self.opt_y = (torch.optim.SGD([self.label_syn], lr=cfg.lr_y, momentum=cfg.momentum_y)
                      if self.label_syn.is_floating_point() else None)
        self.faults = 0
        self._graph = None  # a captured graph holds the previous learnables
        self._order = torch.randperm(self.experts.num_experts, generator=self.generator).tolist()
        self._pos = 0
        # every rank starts from rank 0's set (guards against non-deterministic kernels); no-op in one process
        dd.broadcast_(self._learnables() + [self.syn_lr])

    # ---- one iteration ---------------------------------------------------------------------------------------
    def _next_expert(self) -> int:
        if self._pos >= len(self._order):
            self._order = torch.randperm(self.experts.num_experts, generator=self.generator).tolist()
            self._pos = 0
        k = self._order[self._pos]
        self._pos += 1
        return k

    def start_epoch_upper(self, it: int) -> int:
        """The exclusive upper bound of the start epoch at iteration ``it`` (DATM's sequential generation)."""
        cfg = self.config
        if not cfg.sequential_generation:
            return cfg.max_start_epoch
        grow = int((cfg.max_start_epoch - cfg.current_max_start_epoch) * it / cfg.expansion_end_epoch)
        return min(cfg.current_max_start_epoch + grow, cfg.max_start_epoch)

    def draw_segments(self, world: int = 1):
        """The random draws of one iteration from ``self.generator``: ``world`` segments ``(expert, start_epoch)``
        (the next ``world`` experts of the shuffled order, then ``world`` start epochs in
        ``[min_start_epoch, start_epoch_upper(iteration))``) and the shared plan (:meth:`_plan`). Rank ``r`` of a
        ``world``-process run unrolls segment ``r``; ``world = 1`` is the single-process step.

        Returns:
            ``(segments list[(int, int)], plan list[(int64 indices [batch], DSA seed int or None)])``.
        """
        cfg = self.config
        experts = [self._next_expert() for _ in range(world)]
        upper = self.start_epoch_upper(self.iteration)
        starts = torch.randint(cfg.min_start_epoch, upper, (world,), generator=self.generator).tolist()
        return list(zip(experts, starts)), self._plan()

    def _plan(self) -> List[Tuple[torch.Tensor, Optional[int]]]:
        """Per inner step: the batch indices and the DSA seed (drawn from ``self.generator``)."""
        cfg = self.config
        n = self.image_syn.shape[0]
        bs = n if cfg.batch_syn == 0 else min(cfg.batch_syn, n)
        chunks: List[torch.Tensor] = []
        plan = []
        for _ in range(cfg.syn_steps):
            if not chunks:
                chunks = list(torch.split(torch.randperm(n, generator=self.generator), bs))
            idx = chunks.pop()
            seed = int(torch.randint(1 << 62, (1,), generator=self.generator)) if self._dsa is not None else None
            plan.append((idx.to(self.device), seed))
        return plan

    def _batch(self, images: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor, seed: Optional[int]):
        x = images[idx]
        if seed is not None:
            x = self._dsa(x, seed)
        return x, labels[idx]

    def _inner_loss(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return soft_cross_entropy(functional_forward(self._template, theta, x), y)

    def _learnables(self) -> List[torch.Tensor]:
        out = [self.image_syn]
        if self.label_syn.is_floating_point():
            out.append(self.label_syn)
        return out

    def _unroll(self, theta0: torch.Tensor, target: torch.Tensor, plan) -> float:
        theta = theta0.clone().requires_grad_(True)
        cur = theta
        for idx, seed in plan:
            x, y = self._batch(self.image_syn, self.label_syn, idx, seed)
            (g,) = torch.autograd.grad(self._inner_loss(cur, x, y), cur, create_graph=True)
            cur = cur - self.syn_lr * g
        loss = trajectory_matching_loss(cur, theta0, target, check_finite=False)
        torch.autograd.backward(loss, inputs=self._learnables() + [self.syn_lr])
        return float(loss.detach())

    def _unroll_graphed(self, theta0: torch.Tensor, target: torch.Tensor, plan) -> float:
        """:meth:`_unroll` as a CUDA-graph replay (``cuda_graph=True``): the same loss and gradients; captured
        on first use. Raises ``ValueError`` if the batches differ in size (``batch_syn`` must divide the
        number of synthetic images)."""
        sizes = {int(idx.numel()) for idx, _ in plan}
        if len(sizes) != 1:
            raise ValueError(f"cuda_graph=True needs equal batches; batch_syn={self.config.batch_syn} does not "
                             f"divide the {self.image_syn.shape[0]} synthetic images (batch sizes {sorted(sizes)})")
        if self._graph is None:
            self._graph = _UnrollGraph(self, sizes.pop(), theta0.numel())
            self._graph.fill(theta0, target, plan)
            self._graph.capture()
        else:
            self._graph.fill(theta0, target, plan)
        loss, *grads = self._graph.replay()
        for t, g in zip(self._learnables() + [self.syn_lr], grads):
            t.grad = g.clone() if t.grad is None else t.grad + g
        return float(loss)

    def _tesla(self, theta0: torch.Tensor, target: torch.Tensor, plan) -> float:
        lr = self.syn_lr.detach()
        images, labels = self.image_syn.detach(), self.label_syn.detach()
        thetas = []
        theta = theta0.clone()
        G = torch.zeros_like(theta0)
        for idx, seed in plan:  # pass 1: no meta-graph
            thetas.append(theta)
            x, y = self._batch(images, labels, idx, seed)
            t = theta.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self._inner_loss(t, x, y), t)
            G += g
            theta = theta - lr * g
        q = tesla_quantities(theta0, target, G, lr, check_finite=False)
        v = q.step_vector
        del G, theta
        learn = self._learnables()
        for (idx, seed), th in zip(plan, thetas):  # pass 2: one step's graph at a time
            t = th.detach().requires_grad_(True)
            x, y = self._batch(self.image_syn, self.label_syn, idx, seed)
            (g,) = torch.autograd.grad(self._inner_loss(t, x, y), t, create_graph=True)
            torch.autograd.backward((g * v).sum(), inputs=learn)
        grad_lr = q.grad_lr.to(self.syn_lr.dtype).reshape(())
        self.syn_lr.grad = grad_lr.clone() if self.syn_lr.grad is None else self.syn_lr.grad + grad_lr
        return float(q.loss)

    def matching_loss(self, expert: int, start_epoch: int, seed: int = 0) -> float:
        """The matching loss ``L`` of the current synthetic set for one expert segment, with the inner batches and
        DSA draws taken from a separate generator seeded with ``seed`` (``self.generator`` is not touched and
        nothing is updated). For monitoring and tests: a fixed set of ``(expert, start_epoch, seed)`` gives
        comparable numbers before and after distillation. Raises ``ValueError`` for an out-of-range segment."""
        cfg = self.config
        if not 0 <= start_epoch <= self.experts.num_epochs - cfg.expert_epochs:
            raise ValueError(f"start_epoch {start_epoch} out of range")
        saved = self.generator
        self.generator = torch.Generator().manual_seed(int(seed))
        try:
            plan = self._plan()
        finally:
            self.generator = saved
        theta0 = self.experts.snapshot(expert, start_epoch).to(self.device, torch.float32)
        target = self.experts.snapshot(expert, start_epoch + cfg.expert_epochs).to(self.device, torch.float32)
        images, labels, lr = self.image_syn.detach(), self.label_syn.detach(), self.syn_lr.detach()
        theta = theta0.clone()
        for idx, s in plan:
            x, y = self._batch(images, labels, idx, s)
            t = theta.requires_grad_(True)
            (g,) = torch.autograd.grad(self._inner_loss(t, x, y), t)
            theta = theta.detach() - lr * g
        return float(trajectory_matching_loss(theta, theta0, target, check_finite=False))

    def step(self) -> Dict[str, float]:
        """One DATM iteration (module docstring). Returns ``loss`` (the matching loss), ``start_epoch``,
        ``expert``, ``fault`` (1.0 if the gate skipped the update), ``faults`` (total), ``lr`` (after the step)
        and ``extra_loss``. Under ``torchrun``: ``loss`` and ``start_epoch`` are the means over the ranks,
        ``expert`` is rank 0's, ``fault`` the fraction of the ranks' segments the gate rejected (the update is
        skipped only at 1.0) and ``faults`` counts skipped iterations -- the same numbers on every rank."""
        cfg = self.config
        world = dd.world_size() if dd.is_distributed() else 1
        segments, plan = self.draw_segments(world)
        k, t = segments[dd.rank()]
        theta0 = self.experts.snapshot(k, t).to(self.device, torch.float32)
        target = self.experts.snapshot(k, t + cfg.expert_epochs).to(self.device, torch.float32)
        opts = [o for o in (self.opt_img, self.opt_lr, self.opt_y) if o is not None]
        for o in opts:
            o.zero_grad(set_to_none=True)
        if cfg.grad_mode == "unroll":
            loss = (self._unroll_graphed if cfg.cuda_graph else self._unroll)(theta0, target, plan)
        else:
            loss = self._tesla(theta0, target, plan)
        extra = 0.0
        if self.extra_loss is not None:
            e = self.extra_loss(self.image_syn, self.label_syn)
            if not isinstance(e, torch.Tensor) or e.dim() != 0:
                raise TypeError("extra_loss must return a scalar tensor")
            torch.autograd.backward(e, inputs=self._learnables())
            extra = float(e.detach())
        fault = 0.0 if loss <= cfg.threshold else 1.0
        start = float(t)
        if world > 1:
            loss, fault = self._reduce_gradients(loss, fault == 0.0, world)
            start = sum(s for _, s in segments) / world
            k = segments[0][0]
        if fault == 1.0:
            self.faults += 1
        else:
            for o in opts:
                o.step()
        return {"loss": loss, "start_epoch": start, "expert": float(k), "fault": fault,
                "faults": float(self.faults), "lr": float(self.syn_lr.detach()), "extra_loss": extra}

    def _reduce_gradients(self, loss: float, ok: bool, world: int) -> Tuple[float, float]:
        """Trajectory-parallel gate and mean (module docstring): sums ``[loss, ok]`` over the ranks, scales this
        rank's gradients by ``W / |S|`` (0 if its segment was rejected) and all-reduces their mean, which is
        ``(1 / |S|) sum_{r in S} grad_r``. Returns ``(mean loss, fraction rejected)``; gradients are left
        untouched when every segment was rejected (the caller skips the step)."""
        stats = torch.tensor([loss, float(ok)], dtype=torch.float64, device=self.device)
        dd.all_reduce_sum_([stats])
        n_ok = int(round(float(stats[1])))
        if n_ok > 0:
            grads = [p.grad for p in self._learnables() + [self.syn_lr]]
            scale = world / n_ok if ok else 0.0
            if scale != 1.0:
                for g in grads:
                    if g is not None:
                        g.mul_(scale)
            dd.all_reduce_mean_(grads)
        return float(stats[0]) / world, 1.0 - n_ok / world

    # ---- outputs and state ------------------------------------------------------------------------------------
    def eval_config(self) -> Dict[str, Any]:
        """DATM's evaluation protocol as :class:`ddfast.evaluate.EvalConfig` fields: soft CE with the learned
        lr, SGD momentum 0.9, weight decay 5e-4, lr x0.1 at half, DSA, batch ``eval_batch`` (the harness uses
        ``min(batch, n)``), ``eval_epochs`` epochs, ``eval_runs`` runs."""
        cfg = self.config
        return {"model": cfg.net.model, "model_kwargs": {"width": cfg.net.width, "depth": cfg.net.depth},
                "lr": float(self.syn_lr.detach()), "epochs": cfg.eval_epochs, "num_runs": cfg.eval_runs,
                "batch_size": cfg.eval_batch,
                "loss": "soft_ce" if self.label_syn.is_floating_point() else "ce", "optimizer": "sgd",
                "momentum": 0.9, "weight_decay": 5e-4, "schedule": "step", "dsa": cfg.dsa,
                "dsa_strategy": cfg.dsa_strategy}

    def synthetic_set(self) -> SyntheticSet:
        """The current synthetic set: images in network-input space, label logits, the learned lr, the transform
        (``preprocess["kind"]`` + ``preprocess_state``) and DATM's evaluation protocol."""
        cfg = self.config
        tr = self.transform
        state = {k: v.detach().cpu() for k, v in tr.state_dict().items()}
        preprocess = {"kind": tr.kind, "name": cfg.preprocess, "mean": list(self.train.mean),
                      "std": list(self.train.std), "zca": "zca" in cfg.preprocess, "zca_eps": cfg.zca_eps,
                      "images_transformed": True}
        meta = {"iterations": self.iteration, "faults": self.faults, "config": cfg.to_dict(),
                "grad_mode": cfg.grad_mode, "experts": {"num": self.experts.num_experts,
                                                         "epochs": self.experts.num_epochs,
                                                         "key": self.experts_key,
                                                         "seconds": self.experts.meta.get("seconds")},
                "init": {k: v for k, v in self.init_info.items() if k != "indices"},
                "stages": self.timer.stages, "dataset": self.train.name}
        return SyntheticSet(images=self.image_syn.detach().cpu().clone(), labels=self.label_syn.detach().cpu().clone(),
                            num_classes=self.train.num_classes, ipc=cfg.ipc, method="datm",
                            lr=float(self.syn_lr.detach()), preprocess=preprocess, preprocess_state=state,
                            eval_config=self.eval_config(), metadata=meta)

    def state_dict(self) -> Dict[str, Any]:
        return {"images": self.image_syn.detach().cpu().clone(), "labels": self.label_syn.detach().cpu().clone(),
                "lr": self.syn_lr.detach().cpu().clone(), "opt_img": self.opt_img.state_dict(),
                "opt_lr": self.opt_lr.state_dict(),
                "opt_y": self.opt_y.state_dict() if self.opt_y is not None else None,
                "order": torch.tensor(self._order, dtype=torch.long), "pos": self._pos, "faults": self.faults,
                "experts_key": self.experts_key,
                "init_info": json.dumps({k: v for k, v in self.init_info.items()})}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if self.image_syn is None:
            raise ValueError("DATM.load_state_dict: call initialize() (or run()) first")
        if state.get("experts_key") != self.experts_key:
            self._warn(f"the checkpoint was made with expert buffer {state.get('experts_key')}, the current one is "
                       f"{self.experts_key}; continuing with the current experts")
        with torch.no_grad():
            self.image_syn.copy_(state["images"].to(self.device))
            self.syn_lr.copy_(state["lr"].to(self.device))
            if self.label_syn.is_floating_point():
                self.label_syn.copy_(state["labels"].to(self.device))
            else:
                self.label_syn = state["labels"].to(self.device).clone()
        self._graph = None  # recaptured on the next step (hard labels are a new tensor)
        self.opt_img.load_state_dict(state["opt_img"])
        self.opt_lr.load_state_dict(state["opt_lr"])
        if self.opt_y is not None and state.get("opt_y") is not None:
            self.opt_y.load_state_dict(state["opt_y"])
        self._order = [int(v) for v in state["order"].tolist()]
        self._pos = int(state["pos"])
        self.faults = int(state["faults"])
        self.init_info = json.loads(state.get("init_info", "{}"))


# --------------------------------------------------------------------------------------------------------------
# presets
# --------------------------------------------------------------------------------------------------------------

# Official DATM configs (NUS-HPC-AI-Lab/DATM configs/*/ConvIN/IPC*.yaml, latest versions):
# (syn_steps, expert_epochs, batch_syn, lr_img, lr_lr, lr_y, threshold, min_start, current_max, max_start,
#  expansion_end, sequential_generation, pix_init)
_OFFICIAL = {
    ("cifar10", 1): (80, 2, 10, 100.0, 1e-7, 5.0, 1.1, 0, 4, 4, 1000, False, "samples_predicted_correctly"),
    ("cifar10", 10): (80, 2, 100, 100.0, 1e-5, 2.0, 1.0, 0, 10, 20, 1000, True, "samples_predicted_correctly"),
    ("cifar10", 50): (80, 2, 500, 1000.0, 1e-5, 2.0, 1.0, 0, 20, 40, 2000, True, "samples_predicted_correctly"),
    ("cifar10", 500): (40, 2, 1000, 50.0, 1e-5, 10.0, 1.0, 40, 60, 60, 1000, False, "samples_predicted_correctly"),
    ("cifar10", 1000): (100, 2, 1000, 50.0, 1e-5, 10.0, 1.0, 40, 60, 60, 1000, False, "samples_predicted_correctly"),
    ("cifar100", 1): (40, 3, 1000, 1000.0, 1e-5, 10.0, 1.0, 0, 20, 30, 1000, True, "samples_predicted_correctly"),
    ("cifar100", 10): (80, 2, 1000, 1000.0, 1e-5, 10.0, 1.0, 0, 30, 50, 2000, True, "samples_predicted_correctly"),
    ("cifar100", 50): (80, 2, 1000, 1000.0, 1e-5, 10.0, 1.0, 20, 70, 70, 1000, False, "real"),
    ("cifar100", 100): (80, 2, 1000, 50.0, 1e-5, 10.0, 1.0, 40, 70, 70, 1000, False, "samples_predicted_correctly"),
    ("tiny-imagenet", 1): (40, 2, 1000, 10000.0, 1e-4, 10.0, 1.0, 0, 15, 20, 2000, True, "samples_predicted_correctly"),
    ("tiny-imagenet", 10): (40, 2, 500, 100.0, 1e-4, 10.0, 1.0, 10, 50, 50, 1000, False, "samples_predicted_correctly"),
    ("tiny-imagenet", 50): (20, 2, 1000, 100.0, 1e-4, 10.0, 1.0, 40, 70, 70, 1000, False, "samples_predicted_correctly"),
}

# The quick preset (any dataset; tuned on Fashion-MNIST IPC 10 for a 2-core CPU, see PRESET_DOCS).
_QUICK = dict(expert=dict(net=dict(width=32, depth=3), num_experts=5, epochs=6, optimizer="sgd", subset_per_class=500,
                          batch_size=256, lr=0.01),
              syn_steps=20, expert_epochs=2, batch_syn=100, lr_img=100.0,
              lr_lr=1e-5, lr_y=2.0, threshold=1.0, min_start_epoch=0, current_max_start_epoch=2, max_start_epoch=4,
              expansion_end_epoch=100, sequential_generation=True, iterations=500, checkpoint_every=100,
              eval_epochs=300, eval_batch=128, eval_runs=5)

PRESET_DOCS = {
    "full": ("The official DATM values (configs/*/ConvIN/IPC*.yaml): CIFAR-10 IPC 1/10/50/500/1000, CIFAR-100 IPC "
             "1/10/50/100, Tiny-ImageNet IPC 1/10/50 (ConvNetD4, 64 px); experts 100 x 100 epochs with GSAM "
             "(rho 0.01, alpha 0.3) as DATM's buffer_FTD.py, ZCA, DSA, 10k iterations, 1000-epoch evaluation. "
             "Fashion-MNIST IPC 1/10/50: ConvNet-3 width 128 (28x28x1 padded to 32x32 as MTT does for MNIST) with "
             "the CIFAR-10 values of the same IPC (same class count, image size, network) and 100 GSAM experts x 50 "
             "epochs (MTT's length; the largest window, [0, 40) + M = 2, fits). Meant for a GPU."),
    "quick": ("A CPU-sized DATM for any dataset, tuned on Fashion-MNIST IPC 10 for a 2-core CPU (a few minutes "
              "including the experts): ConvNet-3 width 32; 5 experts x 6 epochs with plain SGD (MTT's recipe: half "
              "the cost of GSAM per step) on 500 samples per class each; syn_steps 20, expert_epochs 2, window "
              "[0, 2) -> [0, 4) over 100 iterations, 500 iterations, all synthetic images per step; "
              "300-epoch evaluation."),
}


def preset_config(preset: str, dataset: str, ipc: int, **overrides: Any) -> DATMConfig:
    """The :class:`DATMConfig` of ``preset`` (``"quick"`` or ``"full"``; :data:`PRESET_DOCS`) for ``dataset`` at
    ``ipc``, with ``overrides`` applied: field names, dotted paths into sub-configs (``"expert.epochs"``) or dicts
    merged into a sub-config (``expert={"epochs": 6}``).

    Raises:
        ValueError: unknown preset, a ``full`` preset for a dataset/IPC without official values (the message lists
            the available ones), or an unknown/bad override field.
    """
    if preset not in ("quick", "full"):
        raise ValueError(f"unknown preset {preset!r}; choose 'quick' or 'full'")
    if isinstance(ipc, bool) or not isinstance(ipc, int) or ipc < 1:
        raise ValueError(f"ipc must be a positive int, got {ipc!r}")
    key = canonical_name(dataset)
    if preset == "quick":
        base: Dict[str, Any] = copy.deepcopy(_QUICK)
    else:
        if key == "fashion-mnist":
            if ipc not in (1, 10, 50):
                raise ValueError(f"no full DATM preset for Fashion-MNIST at ipc={ipc}; available: 1, 10, 50")
            row = _OFFICIAL[("cifar10", ipc)]
            train_epochs = 50
        else:
            if (key, ipc) not in _OFFICIAL:
                avail = sorted(f"{d}/{i}" for d, i in _OFFICIAL) + ["fashion-mnist/1", "fashion-mnist/10",
                                                                    "fashion-mnist/50"]
                raise ValueError(f"no full DATM preset for dataset={dataset!r} ipc={ipc}; available: {avail}")
            row = _OFFICIAL[(key, ipc)]
            train_epochs = 100
        (syn_steps, m, batch_syn, lr_img, lr_lr, lr_y, thr, lo, cur, hi, exp_end, seq, pix) = row
        base = dict(syn_steps=syn_steps, expert_epochs=m, batch_syn=batch_syn, lr_img=lr_img, lr_lr=lr_lr, lr_y=lr_y,
                    threshold=thr, min_start_epoch=lo, current_max_start_epoch=cur, max_start_epoch=hi,
                    expansion_end_epoch=exp_end, sequential_generation=seq, pix_init=pix,
                    expert=dict(net=dict(width=128, depth=4 if key == "tiny-imagenet" else 3), num_experts=100,
                                epochs=train_epochs, optimizer="gsam"),
                    iterations=10000, eval_epochs=1000, eval_batch=128, checkpoint_every=500)
    base["ipc"] = ipc
    for name, value in overrides.items():
        set_path(base, name, value, DATMConfig)
    return DATMConfig.from_dict(base)
