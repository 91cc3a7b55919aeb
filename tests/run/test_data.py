"""Tests of ddfast.data: real Fashion-MNIST files, digits, search order, corrupt IDX, restricted unpickler,
user files and CIFAR-N label files."""
import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from ddfast import data as D
from ddfast.data import CorruptDatasetError, DatasetNotFoundError, load_dataset


FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
have_fmnist = os.path.isfile(os.path.join(FMNIST_DIR, "train-images-idx3-ubyte.gz"))
needs_fmnist = pytest.mark.skipif(not have_fmnist, reason="apt-get install dataset-fashion-mnist (.ci/run does)")


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No $DDFAST_DATA, an empty home cache, no system folders (tests control every search place)."""
    monkeypatch.delenv("DDFAST_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(D, "_SYSTEM_DIRS", {k: [] for k in D._SYSTEM_DIRS})
    return tmp_path


def _idx_bytes(arr: np.ndarray) -> bytes:
    code = {np.dtype(np.uint8): 0x08}[arr.dtype]
    return bytes([0, 0, code, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + arr.tobytes()


def _write_fake_mnist(folder, n=20, seed=0, gz=True):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for prefix in ("train", "t10k"):
        imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labs = rng.integers(0, 10, size=(n,), dtype=np.uint8)
        for kind, arr in (("images-idx3", imgs), ("labels-idx1", labs)):
            p = os.path.join(folder, f"{prefix}-{kind}-ubyte" + (".gz" if gz else ""))
            opener = gzip.open if gz else open
            with opener(p, "wb") as f:
                f.write(_idx_bytes(arr))
        out[prefix] = (imgs, labs)
    return out


@needs_fmnist
def test_fashion_mnist_real_files():
    tr = load_dataset("fashion-mnist", "train")
    te = load_dataset("fashion-mnist", "test")
    assert tr.images.shape == (60000, 1, 28, 28) and te.images.shape == (10000, 1, 28, 28)
    assert tr.images.dtype == torch.float32 and tr.labels.dtype == torch.int64
    assert float(tr.images.min()) == 0.0 and float(tr.images.max()) == 1.0
    assert torch.equal(tr.class_counts(), torch.full((10,), 6000))
    assert torch.equal(te.class_counts(), torch.full((10,), 1000))
    assert tr.classes[0] == "T-shirt/top" and tr.classes[9] == "Ankle boot" and tr.num_classes == 10
    # the stored statistics are the training split's pixel mean/std
    assert abs(tr.mean[0] - float(tr.images.double().mean())) < 1e-3
    assert abs(tr.std[0] - float(tr.images.double().std())) < 1e-3
    assert tr.in_channels == 1 and tr.im_size == (28, 28)


@needs_fmnist
def test_idx_reader_matches_torchvision(tmp_path):
    from torchvision.datasets.mnist import read_image_file, read_label_file

    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        raw = tmp_path / name
        with gzip.open(os.path.join(FMNIST_DIR, name + ".gz"), "rb") as f:
            raw.write_bytes(f.read())
        ours = torch.from_numpy(D.read_idx(os.path.join(FMNIST_DIR, name + ".gz")))
        ref = read_image_file(str(raw)) if "images" in name else read_label_file(str(raw))
        assert torch.equal(ours.long(), ref.long())


def test_search_order_root_then_env_then_system(isolated, monkeypatch):
    monkeypatch.setattr(D, "_EXPECTED_SIZES", {**D._EXPECTED_SIZES, "fashion-mnist": {"train": 20, "test": 20}})
    root_data = _write_fake_mnist(isolated / "root", seed=1)
    env_data = _write_fake_mnist(isolated / "env" / "FashionMNIST" / "raw", seed=2, gz=False)  # torchvision layout
    sys_data = _write_fake_mnist(isolated / "sys", seed=3)
    monkeypatch.setenv("DDFAST_DATA", str(isolated / "env"))
    monkeypatch.setattr(D, "_SYSTEM_DIRS", {**D._SYSTEM_DIRS, "fashion-mnist": [str(isolated / "sys")]})
    ds = load_dataset("fashion-mnist", root=str(isolated / "root"))
    assert np.array_equal((ds.images[:, 0] * 255).round().numpy().astype(np.uint8), root_data["train"][0])
    ds = load_dataset("fashion-mnist", "test")
    assert np.array_equal(ds.labels.numpy(), env_data["t10k"][1].astype(np.int64))
    monkeypatch.delenv("DDFAST_DATA")
    ds = load_dataset("fashion-mnist")
    assert np.array_equal(ds.labels.numpy(), sys_data["train"][1].astype(np.int64))


def test_missing_files_error_says_where_and_how(isolated):
    with pytest.raises(DatasetNotFoundError) as ei:
        load_dataset("fashion-mnist", root=str(isolated / "nowhere"))
    msg = str(ei.value)
    assert str(isolated / "nowhere") in msg and "apt-get install dataset-fashion-mnist" in msg
    assert "download=True" in msg
    with pytest.raises(DatasetNotFoundError, match="cifar-10-batches-py"):
        load_dataset("cifar10", root=str(isolated))


def test_unknown_names_and_splits():
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="split"):
        load_dataset("digits", "val")


@pytest.mark.parametrize("damage", ["truncate_gzip", "truncate_payload", "bad_magic", "trailing", "count_mismatch"])
def test_corrupt_idx_files_are_refused(isolated, monkeypatch, damage):
    monkeypatch.setattr(D, "_EXPECTED_SIZES", {**D._EXPECTED_SIZES, "fashion-mnist": {"train": 20, "test": 20}})
    folder = isolated / "root"
    _write_fake_mnist(folder)
    p = folder / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(p.read_bytes())
    if damage == "truncate_gzip":
        blob = p.read_bytes()
        p.write_bytes(blob[: len(blob) // 2])
    elif damage == "truncate_payload":
        p.write_bytes(gzip.compress(raw[:-100]))
    elif damage == "bad_magic":
        p.write_bytes(gzip.compress(b"\x00\x00\x07\x03" + raw[4:]))
    elif damage == "trailing":
        p.write_bytes(gzip.compress(raw + b"\x00" * 7))
    elif damage == "count_mismatch":
        lab = folder / "train-labels-idx1-ubyte.gz"
        labs = np.zeros(19, np.uint8)
        lab.write_bytes(gzip.compress(_idx_bytes(labs)))
    with pytest.raises(CorruptDatasetError):
        load_dataset("fashion-mnist", root=str(folder))


def test_wrong_split_size_is_refused(isolated):
    _write_fake_mnist(isolated / "root")  # 20 images, not 60,000
    with pytest.raises(CorruptDatasetError, match="not the fashion-mnist train split"):
        load_dataset("fashion-mnist", root=str(isolated / "root"))


def test_digits_split_is_deterministic_and_complete():
    from sklearn.datasets import load_digits

    tr, te = load_dataset("digits"), load_dataset("digits", "test")
    assert len(tr) == 1437 and len(te) == 360
    assert tr.images.shape[1:] == (1, 8, 8) and float(tr.images.max()) <= 1.0
    ref = load_digits()
    idx = np.arange(len(ref.target))
    np.testing.assert_array_equal(te.labels.numpy(), ref.target[idx % 5 == 0])
    np.testing.assert_allclose(tr.images[:, 0].numpy(), ref.images[idx % 5 != 0] / 16.0, rtol=1e-6)
    assert torch.equal(load_dataset("digits").labels, tr.labels)
    assert abs(tr.mean[0] - float(tr.images.double().mean())) < 1e-9


def _write_cifar(folder, n_per=4, proto=2, classes=10):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    all_data, all_labels = [], []
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for f in files:
        data = rng.integers(0, 256, size=(n_per, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, classes, size=n_per)]
        with open(os.path.join(folder, f), "wb") as fh:
            pickle.dump({b"batch_label": b"x", b"labels": labels, b"data": data,
                         b"filenames": [b"f%d" % i for i in range(n_per)]}, fh, protocol=proto)
        all_data.append(data)
        all_labels.append(labels)
    with open(os.path.join(folder, "batches.meta"), "wb") as fh:
        pickle.dump({b"label_names": [b"c%d" % i for i in range(10)], b"num_vis": 3072}, fh, protocol=proto)
    return all_data, all_labels


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("proto", [2, 4, 5])
def test_cifar_restricted_unpickler_reads_format(isolated, monkeypatch, proto):
    monkeypatch.setattr(D, "_EXPECTED_SIZES", {**D._EXPECTED_SIZES, "cifar10": {"train": 20, "test": 4}})
    folder = isolated / "root" / "cifar-10-batches-py"
    data, labels = _write_cifar(folder, proto=proto)
    tr = load_dataset("cifar10", root=str(isolated / "root"))
    te = load_dataset("cifar10", "test", root=str(isolated / "root"))
    assert tr.images.shape == (20, 3, 32, 32) and te.images.shape == (4, 3, 32, 32)
    np.testing.assert_array_equal((tr.images * 255).round().numpy().astype(np.uint8).reshape(20, -1),
                                  np.concatenate(data[:5]))
    assert tr.labels.tolist() == sum(labels[:5], [])
    assert tr.classes == [f"c{i}" for i in range(10)]


def test_restricted_unpickler_refuses_malicious_pickle(isolated, monkeypatch):
    monkeypatch.setattr(D, "_EXPECTED_SIZES", {**D._EXPECTED_SIZES, "cifar10": {"train": 20, "test": 4}})
    folder = isolated / "root" / "cifar-10-batches-py"
    _write_cifar(folder)
    marker = isolated / "pwned"
    with open(folder / "data_batch_3", "wb") as fh:
        pickle.dump({b"data": _Evil(str(marker)), b"labels": [0]}, fh, protocol=2)
    with pytest.raises(CorruptDatasetError, match="refused"):
        load_dataset("cifar10", root=str(isolated / "root"))
    assert not marker.exists()
    # the classic os.system payload and an object-dtype array are refused too
    import io as _io

    class Sys:
        def __reduce__(self):
            return (os.system, ("true",))

    for payload in (pickle.dumps(Sys(), protocol=2), pickle.dumps(np.array([1, "a"], dtype=object), protocol=2)):
        with pytest.raises(pickle.UnpicklingError):
            D.RestrictedUnpickler(_io.BytesIO(payload), encoding="latin1").load()
    # a truncated batch is a clear error, never a partial dataset
    blob = (folder / "data_batch_1").read_bytes()
    _write_cifar(folder)
    (folder / "data_batch_1").write_bytes(blob[: len(blob) // 3])
    with pytest.raises(CorruptDatasetError):
        load_dataset("cifar10", root=str(isolated / "root"))


def test_user_safetensors_and_pt_files(tmp_path):
    from safetensors.torch import save_file

    imgs = torch.randint(0, 256, (12, 3, 5, 5), dtype=torch.uint8)
    labels = torch.arange(12) % 3
    p = str(tmp_path / "mine.safetensors")
    save_file({"images": imgs, "labels": labels}, p, metadata={"classes": '["a", "b", "c"]'})
    ds = load_dataset(p)
    assert ds.images.shape == (12, 3, 5, 5) and ds.classes == ["a", "b", "c"]
    torch.testing.assert_close(ds.images, imgs.float() / 255)
    np.testing.assert_allclose(ds.mean, ds.images.double().mean((0, 2, 3)).numpy(), rtol=1e-6)
    q = str(tmp_path / "mine.pt")
    torch.save({"train_images": torch.rand(6, 4, 4), "train_labels": torch.tensor([0, 1, 0, 1, 0, 1]),
                "test_images": torch.rand(2, 4, 4), "test_labels": torch.tensor([1, 0])}, q)
    assert load_dataset(q).images.shape == (6, 1, 4, 4) and len(load_dataset(q, "test")) == 2
    bad = str(tmp_path / "bad.pt")
    torch.save({"images": torch.rand(3, 1, 2, 2) * 5, "labels": torch.tensor([0, 1, 0])}, bad)
    with pytest.raises(CorruptDatasetError, match=r"\[0, 1\]"):
        load_dataset(bad)
    bad2 = str(tmp_path / "bad2.pt")
    torch.save({"images": torch.rand(3, 1, 2, 2), "labels": torch.tensor([0.0, 1.0, 0.0])}, bad2)
    with pytest.raises(CorruptDatasetError, match="integer"):
        load_dataset(bad2)
    evil = str(tmp_path / "evil.pt")
    torch.save({"images": torch.rand(3, 1, 2, 2), "labels": torch.tensor([0, 1, 0]), "x": _Evil(str(tmp_path / "m"))}, evil)
    with pytest.raises(CorruptDatasetError, match="weights_only"):
        load_dataset(evil)
    trunc = str(tmp_path / "trunc.safetensors")
    open(trunc, "wb").write(open(p, "rb").read()[:-20])
    with pytest.raises(ValueError):
        load_dataset(trunc)
    with pytest.raises(DatasetNotFoundError):
        load_dataset(str(tmp_path / "missing.safetensors"))


def test_human_label_file_loader(tmp_path):
    rng = np.random.default_rng(0)
    clean = rng.integers(0, 10, 50000)
    worse = np.where(rng.random(50000) < 0.4, rng.integers(0, 10, 50000), clean)
    torch.save({"clean_label": clean, "worse_label": worse, "aggre_label": clean}, str(tmp_path / "CIFAR-10_human.pt"))
    got = D.load_human_labels(10, "worse", root=str(tmp_path))
    assert got.dtype == torch.int64 and np.array_equal(got.numpy(), worse)
    with pytest.raises(ValueError, match="not in"):
        D.load_human_labels(10, "random9", root=str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match="CIFAR-100_human.pt"):
        D.load_human_labels(100, "noisy", root=str(tmp_path))
    from ddfast.noise import corrupt_labels

    nl = corrupt_labels(torch.from_numpy(clean), "human:worse", 10, human_root=str(tmp_path))
    assert np.array_equal(nl.labels.numpy(), worse) and abs(nl.rate - float((worse != clean).mean())) < 1e-12
    with pytest.raises(ValueError, match="clean labels"):
        corrupt_labels(torch.from_numpy((clean + 1) % 10), "human:worse", 10, human_root=str(tmp_path))


def test_dataset_container_validation_and_subset():
    ds = load_dataset("digits", "test")
    sub = ds.subset(torch.arange(10))
    assert len(sub) == 10 and torch.equal(sub.labels, ds.labels[:10])
    mask = ds.labels == 3
    assert torch.equal(ds.subset(mask).labels, ds.labels[mask])
    with pytest.raises(ValueError, match="labels must lie"):
        D.ImageDataset(torch.rand(2, 1, 2, 2), torch.tensor([0, 5]), ["a", "b"], (0.5,), (0.2,), "x")
    with pytest.raises(ValueError, match="float32"):
        D.ImageDataset(torch.rand(2, 1, 2, 2).double(), torch.tensor([0, 1]), ["a", "b"], (0.5,), (0.2,), "x")


def test_long_tailed_counts_are_cifar10_lt():
    """The exponential profile gives CIFAR-10-LT's published class sizes (Cao et al., NeurIPS 2019: 5,000 images
    per class, imbalance 100 and 10)."""
    assert D.long_tailed_counts([5000] * 10, 0.01) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert D.long_tailed_counts([5000] * 10, 0.1) == [5000, 3871, 2997, 2320, 1796, 1391, 1077, 834, 645, 500]
    assert D.long_tailed_counts([5000] * 10, 1.0) == [5000] * 10
    assert D.long_tailed_counts([10, 3, 10], 0.5) == [10, 3, 5]  # capped at what a class has
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="imbalance ratio"):
            D.long_tailed_counts([5] * 3, bad)


def test_long_tailed_indices_exact_counts_and_seeded():
    y = torch.arange(10).repeat_interleave(200)[torch.randperm(2000, generator=torch.Generator().manual_seed(1))]
    idx = D.long_tailed_indices(y, 10, 0.05, seed=3)
    counts = torch.bincount(y[idx], minlength=10).tolist()
    assert counts == D.long_tailed_counts([200] * 10, 0.05) and counts[0] == 200 and counts[-1] == 10
    assert torch.equal(idx, idx.unique()) and idx.dtype == torch.int64  # sorted, no repeats
    assert torch.equal(idx, D.long_tailed_indices(y, 10, 0.05, seed=3))
    assert not torch.equal(idx, D.long_tailed_indices(y, 10, 0.05, seed=4))
    with pytest.raises(ValueError, match="labels"):
        D.long_tailed_indices(torch.tensor([0, 11]), 10, 0.5)
