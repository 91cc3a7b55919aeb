"""Scale-out through ``torchrun``: process-group setup, rank helpers and the collectives ddfast uses.

ddfast parallelises over three embarrassingly parallel or data-parallel axes:

1. **Independent jobs** -- expert trajectories (DATM), model pools (DANCE, RCIG), evaluation runs and
   baselines: rank ``r`` of ``W`` takes items ``r, r + W, r + 2W, ...`` (:func:`shard`) and the results are
   gathered on every rank (:func:`all_gather_object`, :func:`gather_by_index`). No other communication.
2. **Trajectory-parallel distillation** (the ssnl/dataset-distillation pattern): every rank holds the
   whole synthetic set, samples its *own* expert trajectory / start epoch (a rank-dependent generator),
   computes the meta-gradient, then ``all_reduce_mean_([grad_images, grad_lr, grad_labels])`` and steps
   an identical optimiser -- an effective batch of ``W`` trajectories per outer step.
3. Rank 0 alone writes files (:func:`is_main`, :func:`main_only`) and shows progress bars.

Launch::

    torchrun --nproc-per-node=G -m ddfast run ...                     # one machine, G processes
    torchrun --nnodes=N --nproc-per-node=G --rdzv-backend=c10d \\
             --rdzv-endpoint=HOST:29400 -m ddfast run ...            # N machines

The backend is NCCL when the run uses CUDA and gloo on CPU; each process binds ``cuda:LOCAL_RANK``.
Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) everything here degrades to the single-process
behaviour: ``rank() == 0``, ``world_size() == 1``, collectives are no-ops.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, TypeVar

import torch
import torch.distributed as dist

__all__ = [
    "init_from_env",
    "destroy",
    "is_distributed",
    "rank",
    "world_size",
    "local_rank",
    "is_main",
    "barrier",
    "device_for_rank",
    "shard",
    "shard_indices",
    "all_reduce_mean_",
    "all_reduce_sum_",
    "broadcast_",
    "broadcast_object",
    "all_gather_object",
    "gather_by_index",
    "main_only",
    "rank_generator",
]

T = TypeVar("T")
_INITIALISED_HERE = False


# ----------------------------------------------------------------------------------------------------------
# process group
# ----------------------------------------------------------------------------------------------------------
def _env_world() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def init_from_env(device: str | torch.device = "cpu", backend: Optional[str] = None,
                  timeout_s: float = 1800.0) -> bool:
    """Initialises the default process group from the ``torchrun`` environment (``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).

    Args:
        device: the device the run uses; ``"cuda"`` selects NCCL and binds ``cuda:LOCAL_RANK``
            (``torch.cuda.set_device``), anything else gloo.
        backend: force a backend (``"gloo"``/``"nccl"``).
        timeout_s: collective timeout.

    Returns:
        True when a multi-process group is active (already, or initialised by this call); False when the
        process runs alone (no ``WORLD_SIZE`` > 1 in the environment).

    Raises:
        RuntimeError: ``WORLD_SIZE`` > 1 but ``torch.distributed`` is unavailable.
    """
    global _INITIALISED_HERE
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if _env_world() <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    if backend is None:
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda" and torch.cuda.is_available():
        torch.cuda.set_device(local_rank() % max(torch.cuda.device_count(), 1))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    _INITIALISED_HERE = True
    return dist.get_world_size() > 1


def destroy() -> None:
    """Destroys the process group if :func:`init_from_env` created it."""
    global _INITIALISED_HERE
    if _INITIALISED_HERE and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _INITIALISED_HERE = False


def is_distributed() -> bool:
    """True inside an initialised process group with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """Global rank (0 when not distributed)."""
    return dist.get_rank() if (dist.is_available() and dist.is_initialized()) else 0


def world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if (dist.is_available() and dist.is_initialized()) else 1


def local_rank() -> int:
    """Rank within the machine (``LOCAL_RANK`` set by torchrun; 0 otherwise)."""
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def is_main() -> bool:
    """True on rank 0 (the process that writes files and shows progress)."""
    return rank() == 0


def barrier() -> None:
    """Waits for every rank (no-op when not distributed)."""
    if is_distributed():
        dist.barrier()


def device_for_rank(device: str | torch.device) -> torch.device:
    """``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun (one GPU per process); other devices unchanged."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
        return torch.device("cuda", local_rank() % max(torch.cuda.device_count(), 1))
    return dev


@contextlib.contextmanager
def main_only() -> Iterator[bool]:
    """``with main_only() as me: if me: write(...)`` -- then every rank waits for rank 0 to finish."""
    try:
        yield is_main()
    finally:
        barrier()


# ----------------------------------------------------------------------------------------------------------
# sharding
# ----------------------------------------------------------------------------------------------------------
def shard_indices(n: int, rank_: Optional[int] = None, world: Optional[int] = None) -> List[int]:
    """The indices in ``range(n)`` that rank ``rank_`` of ``world`` owns: ``rank_, rank_ + world, ...``
    (round-robin, so the expensive items of an ordered list spread evenly). Defaults: this process."""
    r = rank() if rank_ is None else int(rank_)
    w = world_size() if world is None else int(world)
    if w < 1 or not 0 <= r < w:
        raise ValueError(f"rank {r} is not in [0, {w})")
    return list(range(r, int(n), w))


def shard(items: Sequence[T], rank_: Optional[int] = None, world: Optional[int] = None) -> List[T]:
    """This rank's share of ``items`` (round-robin, see :func:`shard_indices`).

    Typical use (expert/pool training)::

        for e in distributed.shard(range(num_experts)):
            train_expert(e, seed=base_seed + e)    # seed from the item, never from the rank
        trajs = distributed.gather_by_index(num_experts, mine)   # every rank gets all of them, in order
    """
    items = list(items)
    return [items[i] for i in shard_indices(len(items), rank_, world)]


# ----------------------------------------------------------------------------------------------------------
# collectives
# ----------------------------------------------------------------------------------------------------------
def _flat_group(tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    out = []
    for t in tensors:
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensors must be tensors (or None), got {type(t).__name__}")
        out.append(t)
    return out


def all_reduce_sum_(tensors: Sequence[Optional[torch.Tensor]]) -> List[torch.Tensor]:
    """Sums every tensor over ranks, in place (coalesced per dtype/device into one flat buffer). ``None``
    entries are skipped. No-op when not distributed. Returns the (same) tensors."""
    ts = _flat_group(tensors)
    if not is_distributed() or not ts:
        return ts
    groups: Dict[Tuple[torch.dtype, torch.device], List[torch.Tensor]] = {}
    for t in ts:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        off = 0
        for t in group:
            n = t.numel()
            with torch.no_grad():
                t.copy_(flat[off:off + n].view_as(t))
            off += n
    return ts


def all_reduce_mean_(tensors: Sequence[Optional[torch.Tensor]]) -> List[torch.Tensor]:
    """Averages every tensor over ranks, in place -- the meta-gradients of trajectory-parallel distillation
    (``all_reduce_mean_([syn_images.grad, syn_lr.grad, syn_labels.grad])`` between ``backward()`` and
    ``optimizer.step()``). ``None`` entries (parameters without a gradient) are skipped; integer tensors
    are refused. No-op when not distributed."""
    ts = _flat_group(tensors)
    for t in ts:
        if not t.is_floating_point() and not t.is_complex():
            raise TypeError(f"all_reduce_mean_ needs floating tensors, got {t.dtype}")
    if not is_distributed() or not ts:
        return ts
    all_reduce_sum_(ts)
    w = float(world_size())
    with torch.no_grad():
        for t in ts:
            t.div_(w)
    return ts


def broadcast_(tensors: Sequence[torch.Tensor], src: int = 0) -> List[torch.Tensor]:
    """Overwrites every tensor with rank ``src``'s values (e.g. the initial synthetic set, so all ranks start
    identical). No-op when not distributed."""
    ts = _flat_group(tensors)
    if is_distributed():
        for t in ts:
            dist.broadcast(t.data, src=src)
    return ts


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (no-op when not distributed)."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> List[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` when not distributed)."""
    if not is_distributed():
        return [obj]
    out: List[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_by_index(n: int, mine: Dict[int, Any]) -> List[Any]:
    """Reassembles results of a :func:`shard_indices` loop: each rank passes ``{index: result}`` for the
    indices it owns; every rank gets the list of all ``n`` results in index order.

    Raises:
        RuntimeError: an index is missing or produced twice.
    """
    merged: Dict[int, Any] = {}
    for part in all_gather_object(dict(mine)):
        for k, v in part.items():
            if k in merged:
                raise RuntimeError(f"gather_by_index: index {k} produced by two ranks")
            merged[int(k)] = v
    missing = [i for i in range(n) if i not in merged]
    if missing:
        raise RuntimeError(f"gather_by_index: no rank produced indices {missing[:10]}")
    return [merged[i] for i in range(n)]


def rank_generator(seed: int, rank_: Optional[int] = None) -> torch.Generator:
    """A CPU generator seeded from ``(seed, rank)`` -- for what must differ between ranks (each rank's
    expert/start-epoch draw in trajectory-parallel distillation) while staying reproducible."""
    r = rank() if rank_ is None else int(rank_)
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + 7919 * (r + 1)) % (2 ** 63 - 1))
