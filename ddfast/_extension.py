"""Loading of the compiled extension ``ddfast._C``.

Importing ``ddfast._C`` runs the static initialisers that register the ``torch.ops.ddfast`` ops. If it is
missing or broken, ddfast still works: every op falls back to its pure-PyTorch reference, and a one-line
warning says why (``DDFAST_VERBOSE_LOAD=1`` adds the traceback). ``DDFAST_DISABLE_EXTENSION=1`` skips the
extension on purpose.
"""
from __future__ import annotations

import os
import traceback
import warnings
from typing import Optional

import torch

_C = None
_LOAD_ERROR: Optional[str] = None


def _load():
    global _C, _LOAD_ERROR
    if os.environ.get("DDFAST_DISABLE_EXTENSION", "0") not in ("", "0"):
        _LOAD_ERROR = "disabled by DDFAST_DISABLE_EXTENSION"
        return
    try:
        from . import _C as module  # noqa: F401  (registers torch.ops.ddfast.*)

        _C = module
    except Exception as exc:  # ImportError, OSError (undefined symbol / ABI mismatch)
        _LOAD_ERROR = f"{type(exc).__name__}: {exc}"
        msg = (
            f"ddfast: compiled ops unavailable ({_LOAD_ERROR}); using the pure-PyTorch references. "
            "Rebuild with `pip install --no-build-isolation -e .` against the installed torch."
        )
        if os.environ.get("DDFAST_VERBOSE_LOAD"):
            msg += "\n" + traceback.format_exc()
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


_load()


def has_extension() -> bool:
    """True when the compiled extension ``ddfast._C`` is loaded (and not disabled)."""
    return _C is not None


def load_error() -> Optional[str]:
    """Why the extension is not loaded, or None when it is."""
    return _LOAD_ERROR


def has_cuda_kernels() -> bool:
    """True when the loaded extension was built with its CUDA kernels."""
    return _C is not None and bool(getattr(_C, "with_cuda", 0))


def build_info() -> dict:
    """Facts about the loaded extension: backend, CUDA architectures, the torch it was built against."""
    if _C is None:
        return {"extension": False, "reason": _LOAD_ERROR}
    return {
        "extension": True,
        "cuda_kernels": bool(getattr(_C, "with_cuda", 0)),
        "cuda_arch_list": getattr(_C, "cuda_arch_list", ""),
        "built_with_torch": getattr(_C, "built_with_torch", ""),
        "running_torch": torch.__version__,
        "path": getattr(_C, "__file__", None),
    }


def use_kernel(*tensors: torch.Tensor) -> bool:
    """Whether the compiled kernel serves these tensors (extension loaded and device supported).

    CPU tensors need the extension; CUDA tensors also need the CUDA kernels. Any other device (MPS, XPU,
    meta under tracing is handled by the fake kernels) uses the reference.
    """
    if _C is None:
        return False
    for t in tensors:
        if t is None:
            continue
        dev = t.device.type
        if dev == "cpu" or dev == "meta":
            continue
        if dev == "cuda" and has_cuda_kernels():
            continue
        return False
    return True
