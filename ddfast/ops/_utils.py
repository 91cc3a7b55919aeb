"""Argument checks shared by the public op wrappers (metadata only: no host-device synchronisation)."""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float64)
FLOAT_AND_HALF_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(op: str, name: str, x, *, dims: Sequence[int], dtypes: Iterable[torch.dtype]) -> None:
    """``TypeError`` unless ``x`` is a tensor of one of ``dtypes``; ``ValueError`` unless ``x.dim()`` is in ``dims``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    dtypes = tuple(dtypes)
    if x.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must have dtype {allowed}; got {str(x.dtype).replace('torch.', '')}")
    if x.dim() not in dims:
        want = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{op}: {name} must be {want}, got shape {tuple(x.shape)}")


def check_same(op: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor) -> None:
    """``ValueError`` unless every tensor in ``others`` is on ``ref``'s device; ``TypeError`` unless it has its dtype."""
    for name, x in others.items():
        if x.device != ref.device:
            raise ValueError(f"{op}: {name} is on {x.device} but {ref_name} is on {ref.device}; put them on one device")
        if x.dtype != ref.dtype:
            raise TypeError(
                f"{op}: {name} has dtype {str(x.dtype).replace('torch.', '')} but {ref_name} has "
                f"{str(ref.dtype).replace('torch.', '')}; they must match"
            )


def fmt_shape(x: torch.Tensor) -> str:
    return str(tuple(x.shape))
