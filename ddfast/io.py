"""Safe, atomic file writing and reading for everything ddfast writes.

Every file is written to a temporary name in the same folder and moved into place with ``os.replace``,
so a killed process never leaves a half-written file under the final name. Tensors go to safetensors;
checkpoints that hold optimiser states go through ``torch.save`` and are read back with
``torch.load(weights_only=True)`` (no arbitrary code on load).

(Shared by the whole project: extend this module, do not replace it.)
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import time
from typing import Any, Dict, Iterator

import torch

__all__ = [
    "WriteError",
    "quarantine",
    "atomic_open",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_save_torch",
    "load_torch",
    "torch_load_weights_only",
    "save_safetensors",
    "load_safetensors",
    "atomic_write",
    "load_json",
    "save_tensors",
    "load_tensors",
    "safetensors_metadata",
]


class WriteError(OSError):
    """A file could not be written (disk full, quota, read-only or unwritable folder); the message names the file
    and the folder. The command line reports it in one line with exit status 2."""


_WRITE_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                 errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                 errno.EPERM: "operation not permitted"}


def _write_error(path: str, exc: BaseException) -> "WriteError | None":
    """A :class:`WriteError` for ``exc`` raised while writing ``path`` (an OSError with a write errno, or the
    error torch's zip writer raises when the device is full), else None."""
    directory = os.path.dirname(os.path.abspath(path))
    why = _WRITE_ERRNOS.get(exc.errno) if isinstance(exc, OSError) else None
    if why is None and isinstance(exc, RuntimeError):
        with contextlib.suppress(OSError):
            if shutil.disk_usage(directory).free < (1 << 20):
                why = "no space left on the device"
    if why is None:
        return None
    return WriteError(getattr(exc, "errno", None) or errno.EIO,
                      f"cannot write {path}: {why} (folder {directory}); free space or choose another folder")


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", **kwargs) -> Iterator[Any]:
    """Opens a temporary file next to ``path``; on a clean exit it is flushed, fsynced and renamed onto
    ``path``; on an exception it is removed and ``path`` is untouched.

    Raises:
        WriteError: the disk or quota is full, or the folder is read-only / not writable (file and folder named).
    """
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the final file the usual permissions
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        err = _write_error(path, exc) if isinstance(exc, Exception) else None
        if err is not None:
            raise err from None
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(text: str, path: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _json_default(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def atomic_write_json(obj: Any, path: str, indent: int = 2) -> None:
    """Writes ``obj`` as JSON (tensors and numpy scalars converted) atomically. NaN/inf are refused."""
    text = json.dumps(obj, indent=indent, default=_json_default, allow_nan=False)
    atomic_write_text(text + "\n", path)


def atomic_save_torch(obj: Any, path: str) -> None:
    """``torch.save`` to ``path`` atomically. Only tensors, numbers, strings, lists, tuples and dicts
    should be saved, so :func:`load_torch` can read them with ``weights_only=True``."""
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def torch_load_weights_only(path: str, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with torch's own warnings about the file's pickle protocol
    silenced (a file it refuses raises; the callers turn that into one error line naming the file)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*pickle protocol.*", category=UserWarning)
        return torch.load(path, map_location=map_location, weights_only=True)


def load_torch(path: str, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``: refuses anything but tensors and plain containers."""
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    try:
        return torch_load_weights_only(path, map_location)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable ddfast checkpoint ({type(exc).__name__}: {exc})") from exc


def save_safetensors(tensors: Dict[str, torch.Tensor], path: str, metadata: Dict[str, str] | None = None) -> None:
    """Saves a flat ``name -> tensor`` dict as safetensors, atomically (tensors made contiguous, on CPU)."""
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    with atomic_open(path, "wb") as f:
        f.write(data)


def load_safetensors(path: str, device: str | torch.device = "cpu") -> Dict[str, torch.Tensor]:
    """Loads a safetensors file; raises ``FileNotFoundError`` or ``ValueError`` (corrupt/truncated)."""
    from safetensors.torch import load_file

    if not os.path.exists(path):
        raise FileNotFoundError(path)
    try:
        return load_file(path, device=str(device))
    except Exception as exc:
        raise ValueError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from exc


# alias named in DEVELOPERS.md ("ddfast.io.atomic_write style")
atomic_write = atomic_open

_JSON_KEY = "ddfast_json"


def load_json(path: str) -> Any:
    """Reads a JSON file; raises ``FileNotFoundError`` or ``ValueError`` (invalid JSON, naming the file)."""
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON ({exc})") from exc


def save_tensors(tensors: Dict[str, torch.Tensor], path: str, meta: Any = None) -> None:
    """Tensors + JSON metadata in one safetensors file, atomically: ``meta`` (any JSON-serialisable
    object; tensors/numpy scalars converted, NaN refused) is stored as a JSON string under the header key
    ``"ddfast_json"``. Read back with :func:`load_tensors`."""
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in tensors.items()):
        raise TypeError("tensors must be a dict str -> torch.Tensor")
    md = None
    if meta is not None:
        md = {_JSON_KEY: json.dumps(meta, default=_json_default, allow_nan=False)}
    save_safetensors(tensors, path, metadata=md)


def safetensors_metadata(path: str) -> Dict[str, str]:
    """The raw ``str -> str`` header metadata of a safetensors file (``{}`` when none)."""
    from safetensors import safe_open

    if not os.path.exists(path):
        raise FileNotFoundError(path)
    try:
        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:
        raise ValueError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from exc


def load_tensors(path: str, device: str | torch.device = "cpu"):
    """Inverse of :func:`save_tensors`: ``(tensors dict, meta)`` (``meta`` is None if none was stored).
    Raises ``FileNotFoundError`` or ``ValueError`` (corrupt/truncated file or metadata)."""
    tensors = load_safetensors(path, device=device)
    raw = safetensors_metadata(path).get(_JSON_KEY)
    if raw is None:
        return tensors, None
    try:
        return tensors, json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: corrupt ddfast metadata ({exc})") from exc


def quarantine(path: str) -> str:
    """Moves a corrupt cache file aside (``PATH.corrupt-<time>``, kept for inspection) so that it is rebuilt;
    returns the new path."""
    dest = f"{path}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
    os.replace(path, dest)
    return dest
