"""Dataset distillers: DATM (with MTT's loss and TESLA's constant-memory gradient), DANCE and RCIG.

Each method module (``datm``, ``dance``, ``rcig``) defines a :class:`~ddfast.distill.base.Distiller`
subclass, its config dataclass, and ``preset_config(preset, dataset, ipc, **overrides)`` which returns the
config for a named preset:

- ``"quick"``: finishes on a 2-core CPU in a few minutes (small network, few experts/iterations);
- ``"full"``: the official values for the dataset and IPC (CIFAR-10/100 from the papers' configs,
  Fashion-MNIST from ddfast's own presets), meant for a GPU.
"""
from __future__ import annotations

import importlib
from typing import Any, Dict

from .base import DistillConfig, Distiller, SyntheticSet, TrainSet

METHODS = {
    "datm": ("ddfast.distill.datm", "DATM"),
    "dance": ("ddfast.distill.dance", "DANCE"),
    "rcig": ("ddfast.distill.rcig", "RCIG"),
}
PRESETS = ("quick", "full")

__all__ = ["METHODS", "PRESETS", "Distiller", "DistillConfig", "SyntheticSet", "TrainSet",
           "get_method", "make_config", "make_distiller"]


def get_method(name: str):
    """The method's module; raises ``ValueError`` for an unknown method."""
    key = name.lower()
    if key not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return importlib.import_module(METHODS[key][0])


def make_config(method: str, preset: str, dataset: str, ipc: int, **overrides: Any) -> DistillConfig:
    """The config of ``method`` for ``preset`` on ``dataset`` at ``ipc`` with ``overrides`` applied."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}")
    return get_method(method).preset_config(preset, dataset, ipc, **overrides)


def make_distiller(method: str, config: DistillConfig, **kwargs: Any) -> Distiller:
    """Instantiates the distiller class of ``method`` with ``config`` (kwargs: device, cache_dir, quiet)."""
    module = get_method(method)
    cls = getattr(module, METHODS[method.lower()][1])
    return cls(config, **kwargs)


def describe_presets() -> Dict[str, Any]:
    """``{method: {preset: description}}`` for ``ddfast info``."""
    out = {}
    for m in METHODS:
        try:
            mod = get_method(m)
            out[m] = getattr(mod, "PRESET_DOCS", {})
        except Exception as exc:  # a method module that fails to import is reported, not fatal
            out[m] = {"error": f"{type(exc).__name__}: {exc}"}
    return out
