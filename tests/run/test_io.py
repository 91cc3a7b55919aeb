"""Tests of ddfast.io: atomic writes, safetensors + JSON metadata, safe torch.load."""
import os

import pytest
import torch

from ddfast import io


def test_atomic_open_keeps_old_file_on_error(tmp_path):
    p = str(tmp_path / "f.txt")
    io.atomic_write_text("old", p)
    with pytest.raises(RuntimeError):
        with io.atomic_write(p, "w") as f:
            f.write("new half")
            raise RuntimeError("killed")
    assert open(p).read() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]  # no temp file left behind


def test_tensors_with_json_metadata_round_trip(tmp_path):
    p = str(tmp_path / "t.safetensors")
    t = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    io.save_tensors(t, p, {"lr": torch.tensor(0.01), "classes": ["x", "y"]})
    got, meta = io.load_tensors(p)
    assert torch.equal(got["a"], t["a"]) and torch.equal(got["b"], t["b"])
    assert meta == {"lr": pytest.approx(0.01), "classes": ["x", "y"]}
    io.save_tensors(t, p)
    assert io.load_tensors(p)[1] is None
    with pytest.raises(ValueError):
        io.save_tensors(t, p, {"bad": float("nan")})
    blob = open(p, "rb").read()
    open(p, "wb").write(blob[:-10])
    with pytest.raises(ValueError):
        io.load_tensors(p)


def test_json_and_torch_load_safety(tmp_path):
    p = str(tmp_path / "x.json")
    io.atomic_write_json({"a": torch.tensor([1, 2])}, p)
    assert io.load_json(p) == {"a": [1, 2]}
    open(p, "w").write("{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        io.load_json(p)

    class Evil:
        def __reduce__(self):
            return (os.getcwd, ())

    q = str(tmp_path / "x.pt")
    torch.save({"x": Evil()}, q)
    with pytest.raises(ValueError, match="not a readable"):
        io.load_torch(q)
    io.atomic_save_torch({"w": torch.ones(2)}, q)
    assert torch.equal(io.load_torch(q)["w"], torch.ones(2))
