"""Content digests (cache keys, fingerprints) and derived seeds, in one place.

Digests name cached artefacts (expert buffers, model pools, baselines, fitted transforms) and fingerprint
checkpoints; they never feed a random generator. Seeds are derived from integers only, so every random draw
of a run is a pure function of the run's seeds and counters (exact resume, same seed -> same result).

- :func:`digest` -- 16 hex digits of SHA-256 over the canonical JSON of a value (sorted keys).
- :func:`tensor_digest` -- 16 hex digits of SHA-256 over the raw bytes of one or more tensors (CPU,
  contiguous), optionally with their shapes and dtypes.
- :func:`derive_seed` / :func:`generator` -- a 62/63-bit seed from integers (SHA-256 of their decimal forms
  joined by ``sep`` after a ``domain`` prefix) and a CPU ``torch.Generator`` seeded with it. The ``domain`` and
  ``sep`` of each caller are fixed constants of that caller (they keep the seeds of earlier ddfast versions).
- :func:`mix_seed` -- the evaluation harness's cheap arithmetic mix of integers (a 63-bit seed).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

__all__ = ["digest", "tensor_digest", "derive_seed", "generator", "mix_seed"]


def digest(obj: Any, n: int = 16) -> str:
    """``n`` hex digits of SHA-256 over ``json.dumps(obj, sort_keys=True, default=str)``."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def tensor_digest(*tensors: Any, n: int = 16, with_meta: bool = False) -> str:
    """``n`` hex digits of SHA-256 over the bytes of ``tensors`` (``None`` entries hash as ``b"none"``).
    With ``with_meta`` each tensor's shape and dtype are hashed before its bytes (two tensors with the same
    bytes but different shapes then differ). bfloat16 tensors are hashed as float32."""
    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            h.update(b"none")
            continue
        t = t.detach().cpu().contiguous()
        if with_meta:
            h.update(str((tuple(t.shape), str(t.dtype))).encode())
        if t.dtype == torch.bfloat16:
            t = t.float()
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:n]


def derive_seed(*parts: int, domain: str = "", sep: str = ",", bits: int = 63) -> int:
    """A ``bits``-bit non-negative seed: the first 8 bytes (little endian) of SHA-256 over
    ``domain + sep.join(str(int(p)) for p in parts)``."""
    text = domain + sep.join(str(int(p)) for p in parts)
    h = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << bits) - 1)


def generator(*parts: int, domain: str = "", sep: str = ",", bits: int = 63) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`derive_seed` of the same arguments."""
    g = torch.Generator(device="cpu")
    g.manual_seed(derive_seed(*parts, domain=domain, sep=sep, bits=bits))
    return g


def mix_seed(*parts: int) -> int:
    """The evaluation harness's seed mix: ``h <- (h * 1000003 + p + 0x9E3779B9) mod (2^63 - 1)`` over ``parts``."""
    h = 0
    for p in parts:
        h = (h * 1_000_003 + int(p) + 0x9E3779B9) % (2 ** 63 - 1)
    return h
