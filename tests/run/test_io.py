"""Tests of ddfast.io: atomic writes, safetensors + JSON metadata, safe torch.load, write errors."""
import json
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


def test_a_full_disk_names_the_file_and_the_folder(tmp_path, monkeypatch):
    """ENOSPC while writing (or torch's zip writer failing on a full device): a WriteError naming the file and
    its folder; the old file is kept and no temporary file is left."""
    import collections
    import errno

    from ddfast import io as dio

    target = tmp_path / "m.json"
    dio.atomic_write_json({"a": 1}, str(target))

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dio.os, "fsync", full)
    with pytest.raises(dio.WriteError, match=r"cannot write .*m\.json: no space left on the device \(folder "):
        dio.atomic_write_json({"a": 2}, str(target))
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(dio.shutil, "disk_usage", lambda d: usage(100, 100, 0))
    monkeypatch.setattr(dio.torch, "save", lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError("[enforce fail at inline_container.cc:671] . unexpected pos 64 vs 0")))
    with pytest.raises(dio.WriteError, match=r"ckpt\.pt: no space left"):
        dio.atomic_save_torch({"x": torch.zeros(3)}, str(tmp_path / "ckpt.pt"))
    assert not (tmp_path / "ckpt.pt").exists()


def test_cli_reports_a_full_disk_in_one_line(tmp_path, monkeypatch, capsys):
    import errno

    import _ddfast_fake

    from ddfast import cli
    from ddfast import io as dio

    _ddfast_fake.register()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DDFAST_CACHE", str(tmp_path / "cache"))

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dio.os, "fsync", full)
    rc = cli.main(["run", "--dataset", "digits", "--method", "fake", "--ipc", "2", "--baselines", "none",
                   "--out", "r", "-O", "distill.iterations=1", "-O", "eval.epochs=1", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "no space left" in err[0] and "folder" in err[0], err
