"""One validated-config mechanism for every ddfast config (distillers, TAD, evaluation, baselines, runs).

A config is a dataclass that inherits :class:`Config`; its fields are declared with :func:`option`, which
records the constraints next to the default::

    @dataclass
    class ExpertRecipe(Config):
        num_experts: int = option(100, ge=1)
        optimizer: str = option("gsam", choices=("gsam", "sgd"))
        lr: float = option(0.01, gt=0)

    @dataclass
    class DATMConfig(Config):
        syn_steps: int = option(80, ge=1)
        expert: ExpertRecipe = option(factory=ExpertRecipe)     # a nested sub-config

Construction validates every field against its annotation (``int``, ``float``, ``bool``, ``str``,
``Optional[...]``, ``Union[...]``, ``dict``, a nested :class:`Config`) and its metadata (``ge``/``gt``/``le``/
``lt``, ``choices``), then calls the class's :meth:`Config.check` for rules that involve several fields. Every
error is a ``ValueError`` whose message starts with the field's path (``DATMConfig.expert.epochs: must be an int
>= 1, got 'abc'``); an unknown option raises :class:`UnknownOptionError` (a ``ValueError`` and a ``TypeError``)
naming it and listing the known ones. Integers given for ``float`` fields become floats; nothing else is
converted (a string is never parsed as a number: ``"5"`` for an ``int`` field is an error that names the field).

Round trips: :meth:`Config.to_dict` (nested dicts, JSON-able), :meth:`Config.from_dict` (strict: unknown keys
raise; nested dicts become sub-configs), :meth:`Config.replace` (a validated copy; nested changes as a dict,
``replace(expert={"epochs": 5})``, or as a dotted path, ``replace(**{"expert.epochs": 5})``).
"""
from __future__ import annotations

import dataclasses
import math
import threading
import typing
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple, Union

__all__ = ["Config", "option", "UnknownOptionError", "set_path", "describe"]

_MISSING = dataclasses.MISSING
_LOCAL = threading.local()


class UnknownOptionError(ValueError, TypeError):
    """Option names that the config does not have (both a ``ValueError`` and a ``TypeError``, as a dataclass
    constructor and ``from_dict`` raise either). Attributes: ``path`` (the config's path, e.g.
    ``"DATMConfig.expert"``), ``names`` (the unknown names) and ``known`` (the valid ones)."""

    def __init__(self, path: str, names, known):
        self.path, self.names, self.known = path, sorted(str(n) for n in names), sorted(known)
        what = f"unknown option {self.names[0]!r}" if len(self.names) == 1 else f"unknown options {self.names}"
        super().__init__(f"{path}: {what}; known: {self.known}")


def option(default: Any = _MISSING, *, factory: Any = _MISSING, ge: Optional[float] = None,
           gt: Optional[float] = None, le: Optional[float] = None, lt: Optional[float] = None,
           choices: Optional[Iterable[Any]] = None, doc: str = "") -> Any:
    """A dataclass field with validation metadata.

    Args:
        default: the default value (or ``factory``: a callable making it, for mutable defaults and sub-configs).
        ge, gt, le, lt: inclusive / exclusive bounds for numbers (checked after the type).
        choices: the allowed values (for strings, or unions such as ``True | False | "relabel"``).
        doc: a one-line description (shown by :func:`describe`).
    """
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": tuple(choices) if choices is not None else None,
            "doc": doc}
    if factory is not _MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        name = " or ".join(_type_name(a) for a in args)
        return f"{name} or None" if type(None) in typing.get_args(hint) else name
    if hint is int:
        return "an int"
    if hint is float:
        return "a number"
    if hint is bool:
        return "a bool (true/false)"
    if hint is str:
        return "a string"
    if origin in (dict, Dict) or hint is dict:
        return "a mapping"
    if isinstance(hint, type) and issubclass(hint, Config):
        return f"a {hint.__name__} mapping"
    return getattr(hint, "__name__", str(hint))


def _check_value(value: Any, hint: Any, path: str) -> Tuple[bool, Any]:
    """``(ok, converted value)`` of ``value`` against the annotation ``hint`` (no bounds)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True, value
    if origin is Union:
        args = typing.get_args(hint)
        if value is None:
            return type(None) in args, None
        for a in args:  # bool before int/float: a bool is not a number here
            if a is type(None):
                continue
            ok, v = _check_value(value, a, path)
            if ok:
                return True, v
        return False, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if hasattr(value, "dim") and hasattr(value, "item") and value.dim() == 0:  # a 0-d tensor (learned lr)
            value = float(value.detach())
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False, value
        return math.isfinite(float(value)), float(value)
    if hint is str:
        return isinstance(value, str), value
    if origin in (dict, Dict) or hint is dict:
        return isinstance(value, Mapping), dict(value) if isinstance(value, Mapping) else value
    if origin in (tuple, Tuple, list) or hint in (tuple, list):
        return isinstance(value, (tuple, list)), value
    if isinstance(hint, type) and issubclass(hint, Config):
        if isinstance(value, hint):
            return True, value.validate(path)
        if isinstance(value, Mapping):
            return True, hint.from_dict(value, path=path)
        return False, value
    if isinstance(hint, type):
        return isinstance(value, hint), value
    return True, value


def _bounds_text(meta: Mapping[str, Any]) -> str:
    parts = []
    for key, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if meta.get(key) is not None:
            parts.append(f"{sym} {meta[key]:g}")
    return " and ".join(parts)


def _describe(hint: Any, meta: Mapping[str, Any]) -> str:
    """What a field must be, in words: ``"an int >= 1 or None"``, ``"one of ['a', 'b']"``."""
    choices = meta.get("choices")
    if choices is not None:
        return f"one of {list(choices)}"
    optional = typing.get_origin(hint) is Union and type(None) in typing.get_args(hint)
    inner = Union[tuple(a for a in typing.get_args(hint) if a is not type(None))] if optional else hint
    text = _type_name(inner)
    bounds = _bounds_text(meta)
    if bounds:
        text += f" {bounds}"
    return f"{text} or None" if optional else text


def _check_field(value: Any, hint: Any, meta: Mapping[str, Any], path: str) -> Any:
    ok, v = _check_value(value, hint, path)
    choices = meta.get("choices")
    if ok and choices is not None and not any(v == c and type(v) is type(c) for c in choices):
        ok = False
    if ok and isinstance(v, (int, float)) and not isinstance(v, bool):
        for key, good in (("ge", lambda a, b: a >= b), ("gt", lambda a, b: a > b), ("le", lambda a, b: a <= b),
                          ("lt", lambda a, b: a < b)):
            bound = meta.get(key)
            if bound is not None and not good(v, bound):
                ok = False
    if not ok:
        finite = " (finite)" if isinstance(value, float) and not math.isfinite(value) else ""
        raise ValueError(f"{path}: must be {_describe(hint, meta)}{finite}, got {value!r}")
    return v


class Config:
    """Base of ddfast's dataclass configs (module docstring). Subclasses are ``@dataclass`` classes whose
    fields come from :func:`option`; they may override :meth:`check` for rules across fields."""

    # ---- validation ----------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        self.validate(getattr(_LOCAL, "path", None))

    @classmethod
    def _hints(cls) -> Dict[str, Any]:
        cache = cls.__dict__.get("_ddfast_hints")
        if cache is None:
            cache = typing.get_type_hints(cls)
            setattr(cls, "_ddfast_hints", cache)
        return cache

    def validate(self, path: Optional[str] = None) -> "Config":
        """Checks every field (module docstring) and :meth:`check`; returns ``self``. ``path`` prefixes the
        messages (default: the class name). Raises ``ValueError`` naming the first bad field."""
        path = path or type(self).__name__
        hints = self._hints()
        for f in dataclasses.fields(self):
            v = _check_field(getattr(self, f.name), hints.get(f.name, Any), f.metadata, f"{path}.{f.name}")
            if v is not getattr(self, f.name):
                object.__setattr__(self, f.name, v)
        object.__setattr__(self, "_ddfast_path", path)
        self.check()
        return self

    def check(self) -> None:
        """Rules across fields; call :meth:`fail` for a violation."""

    def fail(self, field: str, message: str) -> None:
        """Raises ``ValueError("<path>.<field>: <message>")`` (for :meth:`check`)."""
        path = getattr(self, "_ddfast_path", None) or type(self).__name__
        raise ValueError(f"{path}.{field}: {message}")

    # ---- round trips ---------------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        """The config as nested plain dicts (JSON-able when the values are)."""
        out: Dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to_dict() if isinstance(v, Config) else _plain(v)
        return out

    @classmethod
    def field_names(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], path: Optional[str] = None):
        """Builds a validated config from a (nested) mapping; unknown keys raise :class:`UnknownOptionError`."""
        path = path or cls.__name__
        if not isinstance(d, Mapping):
            raise ValueError(f"{path}: must be a mapping of options, got {d!r}")
        names = cls.field_names()
        unknown = [k for k in d if k not in names]
        if unknown:
            raise UnknownOptionError(path, unknown, names)
        hints = cls._hints()
        kwargs = {}
        for k, v in d.items():
            sub = _config_class(hints.get(k))
            if sub is not None and isinstance(v, Mapping):
                v = sub.from_dict(v, path=f"{path}.{k}")
            kwargs[k] = v
        old = getattr(_LOCAL, "path", None)
        _LOCAL.path = path
        try:
            return cls(**kwargs)
        finally:
            _LOCAL.path = old

    def replace(self, **changes: Any):
        """A validated copy with ``changes``: field names, dotted paths into sub-configs
        (``**{"expert.epochs": 5}``) or dicts merged into a sub-config (``expert={"epochs": 5}``).

        Raises:
            UnknownOptionError: a name the config does not have. ValueError: a bad value (named).
        """
        d = self.to_dict()
        for key, value in changes.items():
            set_path(d, key, value, type(self))
        return type(self).from_dict(d)


def _config_class(hint: Any) -> Optional[type]:
    if isinstance(hint, type) and issubclass(hint, Config):
        return hint
    if typing.get_origin(hint) is Union:
        for a in typing.get_args(hint):
            if isinstance(a, type) and issubclass(a, Config):
                return a
    return None


def _plain(v: Any) -> Any:
    if isinstance(v, Config):
        return v.to_dict()
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_plain(x) for x in v)
    return v


def set_path(d: Dict[str, Any], key: str, value: Any, cls: Optional[type] = None) -> None:
    """Sets ``d[a][b]... = value`` for ``key = "a.b..."`` in a config's :meth:`Config.to_dict` form; a dict
    ``value`` for a sub-config is merged into it. With ``cls`` (the config class of ``d``), an unknown name
    raises :class:`UnknownOptionError` naming the full path."""
    parts = str(key).split(".")
    node, node_cls = d, cls
    for i, part in enumerate(parts):
        where = ".".join(parts[:i + 1])
        if node_cls is not None and part not in node_cls.field_names():
            prefix = ".".join([cls.__name__] + parts[:i]) if cls is not None else ".".join(parts[:i])
            raise UnknownOptionError(prefix, [part], node_cls.field_names())
        sub_cls = _config_class(node_cls._hints().get(part)) if node_cls is not None else None
        last = i == len(parts) - 1
        if last:
            if isinstance(value, Mapping) and isinstance(node.get(part), dict) and sub_cls is not None:
                merged = dict(node[part])
                for k, v in value.items():
                    set_path(merged, k, v, sub_cls)
                node[part] = merged
            else:
                node[part] = value
            return
        if not isinstance(node.get(part), dict):
            raise ValueError(f"{where}: is not a group of options (cannot set {key})")
        node = node[part]
        node_cls = sub_cls


def describe(cls: type, prefix: str = "") -> Iterable[Dict[str, Any]]:
    """Every option of ``cls`` (sub-configs flattened into dotted names): ``{"name", "type", "default",
    "constraint", "doc"}`` dicts, in declaration order (``ddfast info``, documentation)."""
    hints = cls._hints()
    for f in dataclasses.fields(cls):
        sub = _config_class(hints.get(f.name))
        if sub is not None:
            yield from describe(sub, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not _MISSING else (
            f.default_factory() if f.default_factory is not _MISSING else None)
        meta = f.metadata
        constraint = (f"one of {list(meta['choices'])}" if meta.get("choices") else _bounds_text(meta))
        yield {"name": prefix + f.name, "type": _type_name(hints.get(f.name, Any)), "default": _plain(default),
               "constraint": constraint, "doc": meta.get("doc", "")}
