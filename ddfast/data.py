"""Datasets as tensors: Fashion-MNIST, MNIST, CIFAR-10/100, scikit-learn's digits, and a user's own files.

``load_dataset(name, split="train", root=None, download=False) -> ImageDataset`` returns every image of the
split in memory as ``float32 [N, C, H, W]`` in ``[0, 1]`` with ``int64 [N]`` labels, the class names and
the per-channel normalisation statistics the distillation papers use.

Where files are looked for (first hit wins), for ``fashion-mnist`` / ``mnist`` (IDX files, ``.gz`` or not):

1. ``root`` (if given), 2. ``$DDFAST_DATA`` (if set), each as the folder itself, its sub-folder named
   after the dataset (``fashion-mnist``, ``fashion_mnist``, ``mnist``) and torchvision's layout
   (``<base>/FashionMNIST/raw``, ``<base>/MNIST/raw``);
3. ``~/.cache/ddfast/data`` (where ``download=True`` puts files when neither ``root`` nor ``$DDFAST_DATA``
   is given), same layouts;
4. the Debian packages' folders: ``/usr/share/datasets/fashion-mnist`` (``apt-get install
   dataset-fashion-mnist``) and ``/usr/share/datasets/mnist``.

For ``cifar10`` / ``cifar100``: the folders ``cifar-10-batches-py`` / ``cifar-100-python`` (the "python
version" archives; torchvision's layout) inside the same bases. The pickles are read with
:class:`RestrictedUnpickler`, which only builds the dicts, lists, strings, bytes, ints and uint8 NumPy arrays
of the format and refuses anything else (no arbitrary code on load).

Errors: a missing dataset raises :class:`DatasetNotFoundError` (a ``FileNotFoundError``) listing every place
looked and how to get the files; a truncated or corrupt file raises :class:`CorruptDatasetError` (a
``ValueError``) naming the file -- never a partial dataset.
"""
from __future__ import annotations

import gzip
import json
import math
import os
import pickle
import struct
import zlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .io import torch_load_weights_only

__all__ = [
    "ImageDataset",
    "load_dataset",
    "long_tailed_counts",
    "long_tailed_indices",
    "sample_per_class",
    "DATASETS",
    "DATASET_ALIASES",
    "GRAYSCALE_DATASETS",
    "canonical_name",
    "DatasetNotFoundError",
    "CorruptDatasetError",
    "RestrictedUnpickler",
    "restricted_load",
    "read_idx",
    "search_dirs",
    "load_human_labels",
    "HUMAN_LABEL_KEYS",
    "FASHION_MNIST_CLASSES",
    "CIFAR10_CLASSES",
]

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]
MNIST_CLASSES = [str(i) for i in range(10)]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# Normalisation statistics used by the papers' code (MTT/DATM ``utils.get_dataset``); for Fashion-MNIST and
# MNIST these are the per-pixel mean/std of the training split (checked by the tests).
_STATS = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762)),
}

#: the datasets :func:`load_dataset` reads
DATASETS = ("fashion-mnist", "mnist", "cifar10", "cifar100", "digits")
#: every accepted spelling -> the canonical name (the one registry of dataset names: presets, noise mappings
#: and caches all go through :func:`canonical_name`). ``tiny-imagenet`` has presets but no loader here.
DATASET_ALIASES = {
    "fashion-mnist": "fashion-mnist", "fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist", "mnist": "mnist", "cifar10": "cifar10", "cifar-10": "cifar10",
    "cifar100": "cifar100", "cifar-100": "cifar100", "digits": "digits", "tiny": "tiny-imagenet",
    "tinyimagenet": "tiny-imagenet", "tiny-imagenet": "tiny-imagenet", "tiny_imagenet": "tiny-imagenet",
}
#: one-channel datasets (no horizontal flips, no ZCA in RCIG's pipeline)
GRAYSCALE_DATASETS = ("fashion-mnist", "mnist", "digits")
# expected split sizes of the standard datasets (a mismatch means a partial or foreign file)
_EXPECTED_SIZES = {
    "fashion-mnist": {"train": 60000, "test": 10000},
    "mnist": {"train": 60000, "test": 10000},
    "cifar10": {"train": 50000, "test": 10000},
    "cifar100": {"train": 50000, "test": 10000},
}
_SYSTEM_DIRS = {
    "fashion-mnist": ["/usr/share/datasets/fashion-mnist"],
    "mnist": ["/usr/share/datasets/mnist"],
    "cifar10": [],
    "cifar100": [],
}
_SUBDIRS = {
    "fashion-mnist": ["", "fashion-mnist", "fashion_mnist", "FashionMNIST/raw", "fashion-mnist/FashionMNIST/raw"],
    "mnist": ["", "mnist", "MNIST/raw", "mnist/MNIST/raw"],
    "cifar10": ["cifar-10-batches-py", "cifar10/cifar-10-batches-py"],
    "cifar100": ["cifar-100-python", "cifar100/cifar-100-python"],
}


class DatasetNotFoundError(FileNotFoundError):
    """The dataset files were not found; the message lists the places looked and how to get them."""


class CorruptDatasetError(ValueError):
    """A dataset file is truncated, corrupt, of the wrong format, or refused by the restricted unpickler."""


# --------------------------------------------------------------------------------------------------------
# the dataset container
# --------------------------------------------------------------------------------------------------------


@dataclass
class ImageDataset:
    """A labelled image set held in memory.

    Attributes:
        images: ``float32 [N, C, H, W]`` in ``[0, 1]``.
        labels: ``int64 [N]`` in ``[0, len(classes))``.
        classes: class names (``len(classes)`` = number of classes C).
        mean, std: per-channel normalisation statistics (tuples of length C) used by
            :class:`ddfast.augment.Normalize`.
        name: dataset name (``"fashion-mnist"``, ..., or the user file's path).
        split: ``"train"`` or ``"test"`` (user files: the split asked for).

    Raises:
        ValueError: shapes, dtypes or ranges violate the above.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: List[str]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    name: str
    split: str = "train"
    source: str = field(default="", compare=False)

    def __post_init__(self):
        if not isinstance(self.images, torch.Tensor) or self.images.dim() != 4:
            raise ValueError(f"images must be a tensor [N, C, H, W], got {getattr(self.images, 'shape', type(self.images))}")
        if self.images.dtype != torch.float32:
            raise ValueError(f"images must be float32, got {self.images.dtype}")
        if not isinstance(self.labels, torch.Tensor) or self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise ValueError("labels must be an int64 tensor [N]")
        if self.labels.shape[0] != self.images.shape[0]:
            raise ValueError(f"images ({self.images.shape[0]}) and labels ({self.labels.shape[0]}) differ in length")
        self.classes = [str(c) for c in self.classes]
        if len(self.classes) < 2:
            raise ValueError("classes must name at least 2 classes")
        if self.labels.numel() and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.classes)):
            raise ValueError(f"labels must lie in [0, {len(self.classes)})")
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        if len(self.mean) != self.images.shape[1] or len(self.std) != self.images.shape[1]:
            raise ValueError("mean/std must have one entry per channel")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def im_size(self) -> Tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def class_counts(self) -> torch.Tensor:
        """``int64 [C]``: samples per class."""
        return torch.bincount(self.labels, minlength=self.num_classes)

    def subset(self, indices) -> "ImageDataset":
        """The samples at ``indices`` (int64 tensor/sequence or bool mask [N]) as a new dataset."""
        idx = torch.as_tensor(indices)
        if idx.dtype == torch.bool:
            if idx.shape != (len(self),):
                raise ValueError(f"indices: a bool mask must have shape [{len(self)}]")
            idx = idx.nonzero().flatten()
        idx = idx.long()
        return ImageDataset(self.images[idx], self.labels[idx], list(self.classes), self.mean, self.std, self.name,
                            self.split, self.source)

    def with_labels(self, labels: torch.Tensor) -> "ImageDataset":
        """The same images with other labels ``int64 [N]`` (e.g. noisy ones)."""
        return ImageDataset(self.images, torch.as_tensor(labels).long(), list(self.classes), self.mean, self.std,
                            self.name, self.split, self.source)

    def to(self, device) -> "ImageDataset":
        return ImageDataset(self.images.to(device), self.labels.to(device), list(self.classes), self.mean, self.std,
                            self.name, self.split, self.source)

    def __repr__(self) -> str:
        return (f"ImageDataset(name={self.name!r}, split={self.split!r}, n={len(self)}, "
                f"shape={tuple(self.images.shape[1:])}, classes={self.num_classes})")


# --------------------------------------------------------------------------------------------------------
# search
# --------------------------------------------------------------------------------------------------------


def _cache_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "ddfast", "data")


def search_dirs(name: str, root: Optional[str] = None) -> List[str]:
    """Candidate folders for dataset ``name`` in search order (see the module docstring); not filtered
    by existence."""
    key = _canonical(name)
    bases = []
    if root:
        bases.append(os.path.expanduser(str(root)))
    env = os.environ.get("DDFAST_DATA")
    if env:
        bases.append(os.path.expanduser(env))
    bases.append(_cache_dir())
    out = []
    for b in bases:
        for sub in _SUBDIRS[key]:
            out.append(os.path.normpath(os.path.join(b, sub)) if sub else os.path.normpath(b))
    out.extend(_SYSTEM_DIRS[key])
    seen, uniq = set(), []
    for d in out:
        if d not in seen:
            seen.add(d)
            uniq.append(d)
    return uniq


def canonical_name(name: str, strict: bool = False) -> str:
    """The canonical name of a dataset (``"FashionMNIST"`` -> ``"fashion-mnist"``, ``"cifar-10"`` ->
    ``"cifar10"``); a name outside the registry (a user's file) is returned lower-cased and stripped, or raises
    ``ValueError`` listing the known datasets when ``strict``."""
    text = str(name).lower().strip()
    key = DATASET_ALIASES.get(text, DATASET_ALIASES.get(text.replace("_", "-")))
    if key is None:
        if strict:
            raise ValueError(f"unknown dataset {name!r}; choose one of {list(DATASETS)} or give a .safetensors/.pt "
                             "path")
        return text
    return key


def _canonical(name: str) -> str:
    key = canonical_name(name, strict=True)
    if key not in DATASETS:
        raise ValueError(f"dataset {name!r} has presets but no loader in ddfast; choose one of {list(DATASETS)} or "
                         "give a .safetensors/.pt path")
    return key


def _how_to_get(key: str) -> str:
    if key == "fashion-mnist":
        return ("Install Debian's package (`sudo apt-get install dataset-fashion-mnist`, files in "
                "/usr/share/datasets/fashion-mnist), or put Zalando's train/t10k-*-ubyte.gz files in $DDFAST_DATA, "
                "or call load_dataset('fashion-mnist', download=True) (torchvision download).")
    if key == "mnist":
        return ("Put the MNIST train/t10k-*-ubyte(.gz) files in $DDFAST_DATA or `root`, or call "
                "load_dataset('mnist', download=True) (torchvision download).")
    folder = "cifar-10-batches-py" if key == "cifar10" else "cifar-100-python"
    return (f"Extract the CIFAR python-version archive so that <root>/{folder}/ exists (root or $DDFAST_DATA), "
            f"or call load_dataset('{key}', download=True) (torchvision's download_and_extract_archive).")


# --------------------------------------------------------------------------------------------------------
# IDX (MNIST-style) files
# --------------------------------------------------------------------------------------------------------

_IDX_DTYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str) -> np.ndarray:
    """Reads an IDX file (LeCun's MNIST format; ``.gz`` or raw) into a NumPy array.

    The header (two zero bytes, a type code, the number of dimensions, big-endian uint32 sizes) is
    validated and the payload must have exactly ``prod(sizes) * itemsize`` bytes.

    Raises:
        CorruptDatasetError: bad magic number, unknown type, truncated or over-long payload, broken gzip.
        FileNotFoundError: ``path`` does not exist.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            with open(path, "rb") as f:
                data = f.read()
    except (EOFError, OSError, zlib.error) as exc:
        raise CorruptDatasetError(f"{path}: truncated or corrupt gzip stream ({type(exc).__name__}: {exc})") from exc
    if len(data) < 4:
        raise CorruptDatasetError(f"{path}: too short for an IDX header ({len(data)} bytes)")
    z0, z1, code, ndim = data[0], data[1], data[2], data[3]
    if z0 != 0 or z1 != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise CorruptDatasetError(f"{path}: bad IDX magic number {data[:4].hex()} (expected 0000 08|09|0b|0c|0d|0e nn)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise CorruptDatasetError(f"{path}: truncated IDX header")
    dims = struct.unpack(">" + "I" * ndim, data[4:header])
    dt = _IDX_DTYPES[code]
    want = math.prod(dims) * dt.itemsize
    got = len(data) - header
    if got != want:
        kind = "truncated" if got < want else "has trailing bytes"
        raise CorruptDatasetError(f"{path}: IDX payload {kind}: header says {dims} ({want} bytes), file has {got}")
    return np.frombuffer(data, dtype=dt, offset=header).reshape(dims).astype(dt.newbyteorder("="), copy=True)


def _idx_files(d: str, split: str) -> Optional[Tuple[str, str]]:
    prefix = "train" if split == "train" else "t10k"
    for ext in (".gz", ""):
        img = os.path.join(d, f"{prefix}-images-idx3-ubyte{ext}")
        lab = os.path.join(d, f"{prefix}-labels-idx1-ubyte{ext}")
        if os.path.isfile(img) and os.path.isfile(lab):
            return img, lab
    return None


def _load_idx_dataset(key: str, split: str, root: Optional[str], download: bool) -> ImageDataset:
    dirs = search_dirs(key, root)
    found = next(((d, f) for d in dirs for f in [_idx_files(d, split)] if f), None)
    if found is None and download:
        _download(key, root)
        found = next(((d, f) for d in search_dirs(key, root) for f in [_idx_files(d, split)] if f), None)
    if found is None:
        raise DatasetNotFoundError(
            f"{key} ({split}) not found. Looked for {'train' if split == 'train' else 't10k'}-images-idx3-ubyte(.gz) "
            f"and the labels file in: " + ", ".join(dirs) + ". " + _how_to_get(key))
    d, (img_path, lab_path) = found
    imgs = read_idx(img_path)
    labs = read_idx(lab_path)
    if imgs.ndim != 3 or imgs.dtype != np.uint8:
        raise CorruptDatasetError(f"{img_path}: expected a uint8 [N, H, W] image file, got {imgs.dtype} {imgs.shape}")
    if labs.ndim != 1 or labs.dtype != np.uint8:
        raise CorruptDatasetError(f"{lab_path}: expected a uint8 [N] label file, got {labs.dtype} {labs.shape}")
    if imgs.shape[0] != labs.shape[0]:
        raise CorruptDatasetError(f"{img_path} has {imgs.shape[0]} images but {lab_path} has {labs.shape[0]} labels")
    expected = _EXPECTED_SIZES[key][split]
    if imgs.shape[0] != expected or imgs.shape[1:] != (28, 28):
        raise CorruptDatasetError(f"{img_path}: {imgs.shape} is not the {key} {split} split ({expected}x28x28)")
    if labs.max() >= 10:
        raise CorruptDatasetError(f"{lab_path}: label {int(labs.max())} out of range [0, 10)")
    images = torch.from_numpy(imgs).to(torch.float32).div_(255.0).unsqueeze(1)
    labels = torch.from_numpy(labs.astype(np.int64))
    classes = FASHION_MNIST_CLASSES if key == "fashion-mnist" else MNIST_CLASSES
    mean, std = _STATS[key]
    return ImageDataset(images, labels, list(classes), mean, std, key, split, source=d)


# --------------------------------------------------------------------------------------------------------
# CIFAR python pickles, restricted unpickler
# --------------------------------------------------------------------------------------------------------

_SAFE_DTYPES = {"u1", "|u1", "uint8", "i1", "|i1", "int8", "<i2", "<i4", "<i8", "<u2", "<u4", "<u8", "<f4", "<f8",
                "i2", "i4", "i8", "u2", "u4", "u8", "f4", "f8", "b1", "|b1", "bool", "int64", "int32", "float32",
                "float64"}


def _safe_dtype(obj, align=False, copy=False):
    if not isinstance(obj, str) or obj not in _SAFE_DTYPES:
        raise pickle.UnpicklingError(f"refused numpy dtype {obj!r} (only plain numeric dtypes are allowed)")
    return np.dtype(obj, align, copy)


def _safe_reconstruct(subtype, shape, dtype_code):
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"refused array subtype {subtype!r}")
    return np.ndarray.__new__(np.ndarray, shape, dtype=np.uint8)


def _safe_frombuffer(buf, dtype, shape, order="C"):
    # protocol >= 4 pickles of contiguous arrays (numpy's ``_frombuffer``)
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(buf, (bytes, bytearray, memoryview)):
        raise pickle.UnpicklingError("refused _frombuffer call")
    if order not in ("C", "F"):
        raise pickle.UnpicklingError("refused _frombuffer order")
    return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order).copy(order=order)


def _safe_codecs_encode(obj, encoding="utf-8", errors="strict"):
    # protocol-2 pickles written by Python 3 store bytes as _codecs.encode(str, "latin1")
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise pickle.UnpicklingError("refused _codecs.encode call")
    return obj.encode("latin1")


class RestrictedUnpickler(pickle.Unpickler):
    """A ``pickle.Unpickler`` that only rebuilds plain containers and NumPy arrays of plain numeric dtypes.

    Allowed globals: ``numpy.core.multiarray._reconstruct`` (also ``numpy._core``), ``numpy.ndarray``,
    ``numpy.dtype`` -- each wrapped so that only ``ndarray`` itself and non-object dtypes can be built --
    ``numpy._core.numeric._frombuffer`` (protocol >= 4) restricted to bytes of a plain dtype,
    and ``_codecs.encode`` restricted to ``(str, "latin1")`` (how Python 3 protocol-2 pickles store bytes).
    Every other global (``os.system``, ``builtins.eval``, ...) and every persistent id raises
    ``pickle.UnpicklingError``.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _safe_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _safe_reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): _safe_dtype,
        ("_codecs", "encode"): _safe_codecs_encode,
        ("numpy.core.numeric", "_frombuffer"): _safe_frombuffer,
        ("numpy._core.numeric", "_frombuffer"): _safe_frombuffer,
    }

    def find_class(self, module, name):
        fn = self._ALLOWED.get((module, name))
        if fn is None:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return fn

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused persistent id")


def restricted_load(path: str):
    """Loads a (Python 2 or 3) pickle file with :class:`RestrictedUnpickler` (``encoding="latin1"`` so
    Python 2 NumPy payloads decode). Raises :class:`CorruptDatasetError` for refused, truncated or corrupt
    pickles, ``FileNotFoundError`` if ``path`` is missing."""
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    try:
        with open(path, "rb") as f:
            obj = RestrictedUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as exc:
        raise CorruptDatasetError(f"{path}: refused or corrupt pickle ({exc})") from exc
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, struct.error, MemoryError) as exc:
        raise CorruptDatasetError(f"{path}: truncated or corrupt pickle ({type(exc).__name__}: {exc})") from exc
    return obj


def _as_str_keys(d) -> dict:
    if not isinstance(d, dict):
        raise CorruptDatasetError(f"expected a dict in the pickle, got {type(d).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in d.items()}


def _cifar_batch(path: str, label_key: str) -> Tuple[np.ndarray, np.ndarray]:
    d = _as_str_keys(restricted_load(path))
    if "data" not in d or label_key not in d:
        raise CorruptDatasetError(f"{path}: missing 'data' or '{label_key}'")
    data, labels = d["data"], d[label_key]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise CorruptDatasetError(f"{path}: 'data' must be a uint8 [N, 3072] array, got "
                                  f"{getattr(data, 'dtype', type(data))} {getattr(data, 'shape', '')}")
    if not isinstance(labels, (list, np.ndarray)) or not all(isinstance(v, (int, np.integer)) for v in labels):
        raise CorruptDatasetError(f"{path}: '{label_key}' must be a list of ints")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (data.shape[0],):
        raise CorruptDatasetError(f"{path}: {data.shape[0]} images but {labels.shape[0]} labels")
    return data, labels


def _load_cifar(key: str, split: str, root: Optional[str], download: bool) -> ImageDataset:
    if key == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        meta_file, label_key, names_key, ncls = "batches.meta", "labels", "label_names", 10
    else:
        files = ["train"] if split == "train" else ["test"]
        meta_file, label_key, names_key, ncls = "meta", "fine_labels", "fine_label_names", 100

    def find():
        for d in search_dirs(key, root):
            if all(os.path.isfile(os.path.join(d, f)) for f in files):
                return d
        return None

    d = find()
    if d is None and download:
        _download(key, root)
        d = find()
    if d is None:
        raise DatasetNotFoundError(f"{key} ({split}) not found. Looked for {files} in: "
                                   + ", ".join(search_dirs(key, root)) + ". " + _how_to_get(key))
    parts = [_cifar_batch(os.path.join(d, f), label_key) for f in files]
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    expected = _EXPECTED_SIZES[key][split]
    if data.shape[0] != expected:
        raise CorruptDatasetError(f"{d}: {data.shape[0]} {split} images, the {key} {split} split has {expected}")
    if labels.min() < 0 or labels.max() >= ncls:
        raise CorruptDatasetError(f"{d}: labels out of range [0, {ncls})")
    classes = None
    meta_path = os.path.join(d, meta_file)
    if os.path.isfile(meta_path):
        meta = _as_str_keys(restricted_load(meta_path))
        names = meta.get(names_key)
        if isinstance(names, list) and len(names) == ncls:
            classes = [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]
    if classes is None:
        classes = CIFAR10_CLASSES if key == "cifar10" else [str(i) for i in range(ncls)]
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()).to(torch.float32).div_(255.0)
    mean, std = _STATS[key]
    return ImageDataset(images, torch.from_numpy(labels), classes, mean, std, key, split, source=d)


def _download(key: str, root: Optional[str]) -> None:
    base = os.path.expanduser(str(root or os.environ.get("DDFAST_DATA") or _cache_dir()))
    os.makedirs(base, exist_ok=True)
    try:
        if key in ("fashion-mnist", "mnist"):
            from torchvision.datasets import MNIST, FashionMNIST

            cls = FashionMNIST if key == "fashion-mnist" else MNIST
            for train in (True, False):
                cls(base, train=train, download=True)
        else:
            from torchvision.datasets import CIFAR10, CIFAR100
            from torchvision.datasets.utils import download_and_extract_archive

            cls = CIFAR10 if key == "cifar10" else CIFAR100
            # only torchvision's download + md5 check; the pickles are read by our restricted unpickler
            download_and_extract_archive(cls.url, base, filename=cls.filename, md5=cls.tgz_md5)
    except Exception as exc:
        raise DatasetNotFoundError(f"{key}: download into {base} failed ({type(exc).__name__}: {exc}). "
                                   + _how_to_get(key)) from exc


# --------------------------------------------------------------------------------------------------------
# scikit-learn digits
# --------------------------------------------------------------------------------------------------------


def _load_digits(split: str) -> ImageDataset:
    """scikit-learn's bundled 8x8 digits (1,797 images, 16 grey levels) scaled to [0, 1].

    Deterministic split: sample i (in scikit-learn's order) is a test sample iff ``i % 5 == 0``
    (360 test, 1,437 train). mean/std are the train split's pixel statistics.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)
    labels = torch.from_numpy(d.target.astype(np.int64))
    is_test = torch.arange(len(labels)) % 5 == 0
    train_imgs = images[~is_test]
    mean = (float(train_imgs.double().mean()),)
    std = (float(train_imgs.double().std()),)
    mask = is_test if split == "test" else ~is_test
    return ImageDataset(images[mask].contiguous(), labels[mask].contiguous(), [str(i) for i in range(10)], mean, std,
                        "digits", split, source="sklearn.datasets.load_digits")


# --------------------------------------------------------------------------------------------------------
# user files
# --------------------------------------------------------------------------------------------------------


def _load_user_file(path: str, split: str) -> ImageDataset:
    """A user's ``.safetensors`` or ``.pt``/``.pth`` file with tensors ``images`` and ``labels`` (or
    ``{split}_images`` / ``{split}_labels``, preferred when present).

    ``images``: uint8 (scaled by 1/255) or float in [0, 1], ``[N, C, H, W]`` or ``[N, H, W]``; ``labels``:
    integer ``[N]``. Optional: ``classes`` (list of names; in safetensors as JSON in the metadata),
    ``mean``/``std`` (per channel; default: computed from the images).
    """
    if not os.path.isfile(path):
        raise DatasetNotFoundError(f"{path}: no such file")
    meta: Dict[str, object] = {}
    if path.endswith(".safetensors"):
        from .io import load_safetensors

        tensors = load_safetensors(path)
        try:
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                raw = f.metadata() or {}
        except Exception:  # pragma: no cover - already validated by load_safetensors
            raw = {}
        for k, v in raw.items():
            try:
                meta[k] = json.loads(v)
            except (TypeError, ValueError):
                meta[k] = v
    else:
        try:
            obj = torch_load_weights_only(path)
        except Exception as exc:
            raise CorruptDatasetError(f"{path}: not loadable with torch.load(weights_only=True) "
                                      f"({type(exc).__name__}: {exc})") from exc
        if not isinstance(obj, dict):
            raise CorruptDatasetError(f"{path}: expected a dict with 'images' and 'labels', got {type(obj).__name__}")
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        meta = {k: v for k, v in obj.items() if not isinstance(v, torch.Tensor)}
    ik = f"{split}_images" if f"{split}_images" in tensors else "images"
    lk = f"{split}_labels" if f"{split}_labels" in tensors else "labels"
    if ik not in tensors or lk not in tensors:
        raise CorruptDatasetError(f"{path}: needs tensors 'images' and 'labels' (or '{split}_images'/'{split}_labels'); "
                                  f"found {sorted(tensors)}")
    images, labels = tensors[ik], tensors[lk]
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4:
        raise CorruptDatasetError(f"{path}: images must be [N, C, H, W] or [N, H, W], got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        images = images.to(torch.float32) / 255.0
    elif images.is_floating_point():
        images = images.to(torch.float32)
        if not torch.isfinite(images).all():
            raise CorruptDatasetError(f"{path}: images contain NaN or inf")
        if images.numel() and (images.min() < 0 or images.max() > 1):
            raise CorruptDatasetError(f"{path}: float images must lie in [0, 1] (got [{float(images.min()):.3g}, "
                                      f"{float(images.max()):.3g}]); store uint8 or un-normalised images")
    else:
        raise CorruptDatasetError(f"{path}: images must be uint8 or float, got {images.dtype}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool or labels.dim() != 1:
        raise CorruptDatasetError(f"{path}: labels must be an integer tensor [N], got {labels.dtype} {tuple(labels.shape)}")
    labels = labels.to(torch.int64)
    if labels.shape[0] != images.shape[0]:
        raise CorruptDatasetError(f"{path}: {images.shape[0]} images but {labels.shape[0]} labels")
    if images.shape[0] == 0:
        raise CorruptDatasetError(f"{path}: no images ({split} split)")
    if labels.numel() and labels.min() < 0:
        raise CorruptDatasetError(f"{path}: negative labels")
    classes = meta.get("classes")
    if classes is None:
        classes = [str(i) for i in range(max(int(labels.max()) + 1 if labels.numel() else 0, 2))]
    classes = [str(c) for c in classes]
    if labels.numel() and int(labels.max()) >= len(classes):
        raise CorruptDatasetError(f"{path}: label {int(labels.max())} but only {len(classes)} classes")
    mean, std = meta.get("mean"), meta.get("std")
    if mean is None or std is None:
        mean = images.double().mean(dim=(0, 2, 3)).tolist()
        std = images.double().std(dim=(0, 2, 3)).clamp_min(1e-8).tolist()
    mean = torch.as_tensor(mean, dtype=torch.float64).reshape(-1).tolist()
    std = torch.as_tensor(std, dtype=torch.float64).reshape(-1).tolist()
    return ImageDataset(images.contiguous(), labels.contiguous(), classes, tuple(mean), tuple(std),
                        str(meta.get("name", path)), split, source=path)


# --------------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------------


def load_dataset(name: str, split: str = "train", root: Optional[str] = None, download: bool = False) -> ImageDataset:
    """Loads a whole split into memory.

    Args:
        name: ``"fashion-mnist"``, ``"mnist"``, ``"cifar10"``, ``"cifar100"``, ``"digits"``, or a path to a
            ``.safetensors`` / ``.pt`` / ``.pth`` file (see :func:`_load_user_file`).
        split: ``"train"`` or ``"test"``.
        root: a folder searched first (module docstring).
        download: fetch through torchvision when the files are not found (needs network).

    Returns:
        :class:`ImageDataset` with ``float32 [N, C, H, W]`` images in [0, 1] and ``int64 [N]`` labels:
        Fashion-MNIST/MNIST 60,000/10,000 x 1x28x28; CIFAR 50,000/10,000 x 3x32x32; digits 1,437/360 x 1x8x8
        (test = every 5th sample).

    Raises:
        ValueError: unknown ``name`` or ``split``.
        DatasetNotFoundError: files missing (message: where it looked, how to get them).
        CorruptDatasetError: truncated/corrupt/refused files.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not isinstance(name, (str, os.PathLike)):
        raise TypeError(f"name must be a str or path, got {type(name).__name__}")
    name = os.fspath(name)
    if name.endswith((".safetensors", ".pt", ".pth")) or (os.sep in name and os.path.isfile(name)):
        return _load_user_file(name, split)
    key = _canonical(name)
    if key in ("fashion-mnist", "mnist"):
        return _load_idx_dataset(key, split, root, download)
    if key in ("cifar10", "cifar100"):
        return _load_cifar(key, split, root, download)
    return _load_digits(split)


# --------------------------------------------------------------------------------------------------------
# CIFAR-N human labels
# --------------------------------------------------------------------------------------------------------

HUMAN_LABEL_KEYS = {
    10: {"clean": "clean_label", "aggre": "aggre_label", "worse": "worse_label", "worst": "worse_label",
         "random1": "random_label1", "random2": "random_label2", "random3": "random_label3",
         "rand1": "random_label1", "rand2": "random_label2", "rand3": "random_label3"},
    100: {"clean": "clean_label", "noisy": "noisy_label", "noisy100": "noisy_label",
          "noisy_coarse": "noisy_coarse_label", "clean_coarse": "clean_coarse_label"},
}


def long_tailed_counts(class_sizes: Sequence[int], ratio: float) -> List[int]:
    """Per-class image counts of an exponentially long-tailed subset: ``n_c = floor(n_max * ratio ** (c / (C - 1)))``
    for class index ``c`` (class 0 keeps ``n_max``, the last class ``n_max * ratio``), capped at the images the
    class has and at least 1. The profile of CIFAR-10-LT (Cao et al., "Learning Imbalanced Datasets with
    Label-Distribution-Aware Margin Loss", NeurIPS 2019, Sec. 4.1; ``ratio`` = n_min / n_max, their 1 / rho).

    Args:
        class_sizes: images per class of the full training set (``[C]``; ``n_max = max(class_sizes)``).
        ratio: n_min / n_max in (0, 1]; 1 keeps every class at ``n_max`` (capped).

    Raises:
        ValueError: ``ratio`` outside (0, 1], no classes, or a negative class size.
    """
    r = float(ratio)
    if not (0.0 < r <= 1.0):
        raise ValueError(f"imbalance ratio must be in (0, 1] (n_min / n_max), got {ratio!r}")
    sizes = [int(n) for n in class_sizes]
    if not sizes or min(sizes) < 0:
        raise ValueError(f"class sizes must be a non-empty list of counts >= 0, got {sizes}")
    C, n_max = len(sizes), max(sizes)
    out = []
    for c, have in enumerate(sizes):
        want = n_max * r ** (c / (C - 1)) if C > 1 else n_max
        out.append(max(1, min(have, int(math.floor(want + 1e-9)))))
    return out


def long_tailed_indices(labels: torch.Tensor, num_classes: int, ratio: float, seed: int = 0) -> torch.Tensor:
    """``int64 [n]`` sorted indices of a seeded long-tailed subset of a training set (:func:`long_tailed_counts`
    with the class sizes of ``labels``): each class keeps a uniformly random sample of its count. Apply it to
    the *clean* labels, before any label noise (the protocol of the long-tailed noisy-label papers); the test
    set stays balanced.

    Raises:
        ValueError: a bad ``ratio`` or labels outside ``[0, num_classes)``.
    """
    y = torch.as_tensor(labels).long()
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes})")
    counts = long_tailed_counts(torch.bincount(y, minlength=num_classes).tolist(), ratio)
    return sample_per_class(y, counts, seed)


def sample_per_class(labels: torch.Tensor, counts: Sequence[int], seed: int = 0) -> torch.Tensor:
    """``int64 [n]`` sorted indices: for each class ``c`` in order, ``counts[c]`` distinct samples with
    ``labels == c`` drawn uniformly (all of them when the class has fewer), from one generator seeded ``seed``."""
    y = torch.as_tensor(labels).long()
    g = torch.Generator().manual_seed(int(seed))
    keep = []
    for c, k in enumerate(counts):
        ic = (y == c).nonzero().flatten()
        keep.append(ic[torch.randperm(ic.numel(), generator=g)[: int(k)]])
    return torch.cat(keep).sort().values if keep else torch.zeros(0, dtype=torch.int64)


def load_human_labels(num_classes: int, key: str, root: Optional[str] = None, path: Optional[str] = None) -> torch.Tensor:
    """CIFAR-10N / CIFAR-100N human labels (Wei et al., ICLR 2022, "Learning with noisy labels revisited").

    Reads ``CIFAR-10_human.pt`` (``num_classes=10``) or ``CIFAR-100_human.pt`` (100): a dict of integer arrays
    of length 50,000 in CIFAR's training order, loaded with ``torch.load(weights_only=True)`` (NumPy arrays
    allowed through ``torch.serialization.safe_globals``). Searched in ``path`` (a file), ``root``,
    ``$DDFAST_DATA``, and their ``cifar-n``/``CIFAR-N``/``data`` sub-folders.

    Args:
        key: ``aggre``, ``worse`` (``worst``), ``random1..3`` (``rand1..3``), ``clean`` for CIFAR-10N;
            ``noisy`` (``noisy100``), ``clean``, ``noisy_coarse`` for CIFAR-100N; or the file's own key
            (e.g. ``"worse_label"``).

    Returns:
        ``int64 [50000]``.

    Raises:
        ValueError: unknown ``key``/``num_classes``; DatasetNotFoundError; CorruptDatasetError.
    """
    if num_classes not in (10, 100):
        raise ValueError(f"num_classes: human labels exist for CIFAR-10 (10) and CIFAR-100 (100), got {num_classes}")
    fname = "CIFAR-10_human.pt" if num_classes == 10 else "CIFAR-100_human.pt"
    if path is None:
        bases = [b for b in (root, os.environ.get("DDFAST_DATA"), _cache_dir()) if b]
        cands = [os.path.join(os.path.expanduser(b), sub, fname) for b in bases for sub in ("", "cifar-n", "CIFAR-N", "data")]
        path = next((c for c in cands if os.path.isfile(c)), None)
        if path is None:
            raise DatasetNotFoundError(f"{fname} not found in: " + ", ".join(cands) + ". Get it from the CIFAR-N "
                                       "release (github.com/UCSC-REAL/cifar-10-100n, folder data/) and put it in "
                                       "$DDFAST_DATA.")
    try:
        obj = torch_load_weights_only(path)
    except Exception:
        try:
            import numpy.dtypes as npd

            allowed = [np.ndarray, np.dtype, _np_reconstruct(), npd.Int64DType, npd.Int32DType, npd.UInt8DType,
                       npd.Int16DType, npd.Int8DType]
            with torch.serialization.safe_globals(allowed):
                obj = torch_load_weights_only(path)
        except Exception as exc:
            raise CorruptDatasetError(f"{path}: not loadable with torch.load(weights_only=True) "
                                      f"({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise CorruptDatasetError(f"{path}: expected a dict of label arrays, got {type(obj).__name__}")
    table = HUMAN_LABEL_KEYS[num_classes]
    file_key = table.get(str(key).lower(), key)
    if file_key not in obj:
        raise ValueError(f"key {key!r} not in {fname}; choose one of {sorted(table)} or the file keys {sorted(obj)}")
    arr = obj[file_key]
    t = torch.as_tensor(np.asarray(arr)) if not isinstance(arr, torch.Tensor) else arr
    if t.dim() != 1 or t.is_floating_point() or t.shape[0] != 50000:
        raise CorruptDatasetError(f"{path}: '{file_key}' must be 50,000 integer labels, got {t.dtype} {tuple(t.shape)}")
    t = t.to(torch.int64)
    ncls = 20 if "coarse" in file_key else num_classes
    if t.min() < 0 or t.max() >= ncls:
        raise CorruptDatasetError(f"{path}: '{file_key}' labels out of range [0, {ncls})")
    return t


def _np_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover
        from numpy.core.multiarray import _reconstruct
    return _reconstruct
