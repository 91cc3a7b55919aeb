"""Test helpers shared by every folder of the suite: devices (CUDA skipped without a GPU), dtype tolerances,
seeded generators and input makers. Import them as ``from _helpers import DEVICES, tol, randn``.

Op tests parametrise over ``DEVICES`` (``"cuda"`` carries the ``cuda`` mark and a skip when no GPU is present)
and take their tolerances from ``TOL`` so that every dtype is held to a bound that fits its precision.
"""
from __future__ import annotations

from typing import Optional, Sequence

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]),
]

# (rtol, atol) for comparing an op's output in `dtype` with a float64 truth of the same inputs.
TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (2e-5, 1e-6),
    torch.float16: (2e-3, 1e-4),
    torch.bfloat16: (1.6e-2, 1e-3),
}

FLOAT_DTYPES = [torch.float32, torch.float64]
ALL_FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def tol(dtype: torch.dtype, scale: float = 1.0):
    """``dict(rtol=, atol=)`` for ``torch.testing.assert_close``; ``scale`` widens both (ill-conditioned maths)."""
    rtol, atol = TOL[dtype]
    return {"rtol": rtol * scale, "atol": atol * scale}


def gen(seed: int = 0, device: str = "cpu") -> torch.Generator:
    """A seeded generator on ``device`` (every random input in the tests comes from one)."""
    return torch.Generator(device=device).manual_seed(seed)


def randn(shape: Sequence[int], *, dtype=torch.float32, device="cpu", seed: int = 0, scale: float = 1.0,
          noncontig: Optional[str] = None, requires_grad: bool = False) -> torch.Tensor:
    """Seeded normal tensor of ``shape``. ``noncontig``: None (contiguous), ``"rowstride"`` (a slice of a wider
    buffer: rows not adjacent, inner stride 1), ``"step"`` (every other element of the last dimension),
    ``"transpose"`` (a transposed buffer: the last dimension has a non-unit stride)."""
    g = gen(seed, device)
    shape = tuple(shape)
    if noncontig is None or len(shape) == 0:
        x = torch.randn(shape, generator=g, dtype=torch.float64, device=device)
    elif noncontig == "rowstride":
        x = torch.randn(shape[:-1] + (shape[-1] + 5,), generator=g, dtype=torch.float64, device=device)[..., 3:3 + shape[-1]]
    elif noncontig == "step":
        x = torch.randn(shape[:-1] + (2 * shape[-1],), generator=g, dtype=torch.float64, device=device)[..., ::2]
    elif noncontig == "transpose":
        x = torch.randn(shape[::-1], generator=g, dtype=torch.float64, device=device).permute(*range(len(shape) - 1, -1, -1))
    else:
        raise ValueError(noncontig)
    x = x * scale if noncontig is None else _scale_view(x, scale)
    x = x.to(dtype) if noncontig is None else _restride(x, dtype)
    return x.requires_grad_(requires_grad)


def _scale_view(view: torch.Tensor, scale: float) -> torch.Tensor:
    return view.mul_(scale) if scale != 1.0 else view


def _restride(view: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``view`` converted to ``dtype`` with the same (non-contiguous) layout."""
    if view.is_contiguous():
        return view.to(dtype)
    if view.dim() >= 2 and view.stride(-1) == 1:  # rowstride: slice a converted wider buffer
        pad = view.stride(-2) - view.size(-1)
        wide = torch.zeros(view.shape[:-1] + (view.size(-1) + pad,), dtype=dtype, device=view.device)
        wide[..., :view.size(-1)] = view.to(dtype)
        return wide[..., :view.size(-1)]
    if view.stride(-1) == 2 and view.dim() >= 1:  # step
        wide = torch.zeros(view.shape[:-1] + (2 * view.size(-1),), dtype=dtype, device=view.device)
        wide[..., ::2] = view.to(dtype)
        return wide[..., ::2]
    # transpose
    perm = list(range(view.dim() - 1, -1, -1))
    return view.permute(*perm).contiguous().to(dtype).permute(*perm)


def assert_noncontig_kind(x: torch.Tensor, kind: Optional[str]) -> None:
    """Guards the tests themselves: the input really has the intended layout."""
    if kind is None:
        assert x.is_contiguous()
    else:
        assert not x.is_contiguous(), kind
