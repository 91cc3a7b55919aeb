"""ddfast.config (the one validated-config mechanism) and ddfast.hashing (digests and derived seeds)."""
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Optional, Union

import pytest
import torch

from ddfast.config import Config, UnknownOptionError, describe, option
from ddfast.hashing import derive_seed, digest, mix_seed, tensor_digest


@dataclass
class Inner(Config):
    width: int = option(8, ge=1)
    norm: str = option("instance", choices=("instance", "none"))


@dataclass
class Outer(Config):
    lr: float = option(0.1, gt=0, le=1)
    steps: int = option(3, ge=0)
    tau: Optional[float] = option(None, gt=0, lt=1)
    mode: Union[bool, str] = option(True, choices=(True, False, "relabel"))
    inner: Inner = option(factory=Inner)

    def check(self):
        if self.steps > 10 and self.inner.width > 100:
            self.fail("steps", "too many steps for so wide a network")


def test_types_bounds_and_choices_name_the_field():
    for kw, needle in [({"lr": 0.0}, "Outer.lr: must be a number > 0 and <= 1, got 0.0"),
                       ({"lr": float("nan")}, "Outer.lr"), ({"lr": "0.1"}, "Outer.lr"), ({"lr": True}, "Outer.lr"),
                       ({"steps": 1.5}, "Outer.steps: must be an int >= 0"), ({"steps": -1}, "Outer.steps"),
                       ({"tau": 1.0}, "Outer.tau: must be a number > 0 and < 1 or None"),
                       ({"mode": "yes"}, "Outer.mode: must be one of [True, False, 'relabel']"),
                       ({"mode": 1}, "Outer.mode"), ({"inner": {"width": 0}}, "Outer.inner.width")]:
        with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")):
            Outer.from_dict(kw)
    assert Outer(lr=1).lr == 1.0 and isinstance(Outer(lr=1).lr, float)  # ints become floats
    assert Outer(tau=None).tau is None and Outer(mode="relabel").mode == "relabel"
    with pytest.raises(ValueError, match="Outer.steps: too many steps"):
        Outer(steps=11, inner=Inner(width=101))


def test_round_trip_nested_and_strict():
    o = Outer(lr=0.5, inner=Inner(width=4, norm="none"))
    d = o.to_dict()
    assert d == {"lr": 0.5, "steps": 3, "tau": None, "mode": True, "inner": {"width": 4, "norm": "none"}}
    assert json.loads(json.dumps(d)) == d and Outer.from_dict(d) == o
    with pytest.raises(UnknownOptionError, match="Outer.inner: unknown option 'widht'"):
        Outer.from_dict({"inner": {"widht": 3}})
    with pytest.raises(TypeError):  # also a TypeError, like a dataclass constructor
        Outer.from_dict({"bogus": 1})
    e = UnknownOptionError("X", ["b", "a"], ["c"])
    assert e.names == ["a", "b"] and e.known == ["c"] and isinstance(e, ValueError)


def test_replace_by_dotted_path_and_by_dict():
    o = Outer()
    assert o.replace(**{"inner.width": 16}).inner == Inner(width=16)
    assert o.replace(inner={"norm": "none"}).inner == Inner(width=8, norm="none")  # merged, width kept
    assert o.replace(lr=0.2, **{"inner.width": 2}) == Outer(lr=0.2, inner=Inner(width=2))
    assert o == Outer()  # replace returns a copy
    with pytest.raises(UnknownOptionError, match=r"Outer.inner: unknown option 'depth'"):
        o.replace(**{"inner.depth": 3})
    with pytest.raises(ValueError, match="lr: is not a group of options"):
        o.replace(**{"lr.x": 3})
    with pytest.raises(ValueError, match="Outer.inner.width: must be an int >= 1, got 'abc'"):
        o.replace(**{"inner.width": "abc"})


def test_describe_lists_nested_options():
    rows = {r["name"]: r for r in describe(Outer)}
    assert list(rows) == ["lr", "steps", "tau", "mode", "inner.width", "inner.norm"]
    assert rows["lr"]["constraint"] == "> 0 and <= 1" and rows["inner.norm"]["constraint"] == "one of ['instance', 'none']"
    assert rows["inner.width"]["default"] == 8


def test_every_ddfast_config_round_trips():
    from ddfast.baselines import BaselineConfig
    from ddfast.distill import make_config
    from ddfast.evaluate import EvalConfig
    from ddfast.pipeline import DataOptions, RunConfig
    from ddfast.tad import TADConfig

    cfgs = [make_config(m, p, "fashion-mnist", 10) for m in ("datm", "dance", "rcig") for p in ("quick", "full")]
    cfgs += [TADConfig(), EvalConfig(), BaselineConfig(), DataOptions(), RunConfig()]
    for c in cfgs:
        d = c.to_dict()
        assert type(c).from_dict(json.loads(json.dumps(d))).to_dict() == json.loads(json.dumps(d)), type(c)


def test_digests_and_seeds_against_their_definitions():
    obj = {"b": [1, 2], "a": "x"}
    assert digest(obj) == hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]
    t = torch.arange(6, dtype=torch.float32).view(2, 3)
    assert tensor_digest(t) == hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16]
    assert tensor_digest(t.t()) == hashlib.sha256(t.t().contiguous().numpy().tobytes()).hexdigest()[:16]
    assert tensor_digest(t, with_meta=True) != tensor_digest(t.view(3, 2), with_meta=True)
    assert tensor_digest(t) == tensor_digest(t.view(3, 2))
    h = hashlib.sha256(b"tad:1:2:3").digest()
    assert derive_seed(1, 2, 3, domain="tad:", sep=":", bits=62) == int.from_bytes(h[:8], "little") & (2 ** 62 - 1)
    assert 0 <= derive_seed(-5, 7) < 2 ** 63 and derive_seed(1, 2) != derive_seed(2, 1)
    h = 0
    for p in (3, 4):
        h = (h * 1_000_003 + p + 0x9E3779B9) % (2 ** 63 - 1)
    assert mix_seed(3, 4) == h
    assert math.isfinite(float(derive_seed(0)))
