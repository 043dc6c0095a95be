"""MNIST-format IDX files -> normalised tensors, and the seeded train/validation split.

Also the one place that knows each file's expected MD5: the download stage verifies what it fetches
against it, and ``verified_md5s`` lets a stage run directly check the data it is about to read.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mnist_cnn.core.errors import ProjectError

FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}


# Per-dataset pixel mean and std (of the 60k training images, pixels scaled to [0, 1]).
NORMALISATION = {
    "mnist": (0.1307, 0.3081),
    "fashion-mnist": (0.2860, 0.3530),
}


_IDX_DTYPE = {0x08: np.uint8}


# A JSON file {file name: MD5} that replaces torchvision's checksums: for private variants of the data
# (the test suite's tiny data set). The files are verified all the same, against these sums.
CHECKSUMS_ENV = "MNIST_MD5S"


class DataError(ProjectError, ValueError):
    """A data file is missing, is not a well-formed IDX file, or is not the file that was downloaded."""


def _missing(path: Path) -> DataError:
    return DataError(f"{path}: file not found (run the download stage first)")


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # uint8, (N, 28, 28)
    labels: torch.Tensor  # int64, (N,)


def read_idx(path: Path) -> np.ndarray:
    """Read a gzipped IDX file (the MNIST format) into an array of its declared shape."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes())
    except FileNotFoundError:
        raise _missing(path) from None
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable gzip file ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPE:
        raise DataError(f"{path}: not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape)) + header
    if len(raw) != expected:
        raise DataError(f"{path}: expected {expected} bytes for shape {shape}, found {len(raw)}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def load_split(data_dir: Path, train: bool) -> Split:
    """The training (60k) or test (10k) images and labels from ``data_dir``."""
    prefix = "train" if train else "test"
    images = read_idx(Path(data_dir) / FILES[f"{prefix}_images"])
    labels = read_idx(Path(data_dir) / FILES[f"{prefix}_labels"])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{data_dir}: {prefix} images {images.shape} and labels {labels.shape} do not match")
    return Split(torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64)))


def normalise(images: torch.Tensor, dataset: str) -> torch.Tensor:
    """uint8 (N, 28, 28) or (N, 1, 28, 28) pixels -> float32 (N, 1, 28, 28), zero mean and unit std."""
    mean, std = NORMALISATION[dataset]
    x = images.to(torch.float32)
    if x.dim() == 3:
        x = x.unsqueeze(1)
    return (x / 255.0 - mean) / std


def split_indices(n: int, val_split: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed, seeded permutation of ``range(n)`` cut into (train, validation) indices."""
    n_val = int(round(n * val_split))
    if n_val < 1 or n_val >= n:
        raise DataError(f"val_split {val_split} of {n} samples leaves an empty train or validation set")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def split_digests(md5s: Mapping[str, str], val_split: float, seed: int) -> dict[str, str]:
    """``{context: digest}`` for MLflow's dataset tracking, from the files' MD5s (no data hashed again).

    Training and validation come from the same two files: their digests also hold the cut (val_split,
    seed), so another split is another dataset. Twelve hex digits: short in the UI, ample for a few
    versions of one data set.
    """

    def digest(*parts: object) -> str:
        return hashlib.md5("/".join(map(str, parts)).encode()).hexdigest()[:12]

    train = (md5s[FILES["train_images"]], md5s[FILES["train_labels"]])
    return {
        "training": digest(*train, "training", val_split, seed),
        "validation": digest(*train, "validation", val_split, seed),
        "test": digest(md5s[FILES["test_images"]], md5s[FILES["test_labels"]]),
    }


def torchvision_dataset(dataset: str) -> type:
    """torchvision's class for ``dataset``, which knows the files' mirrors and MD5s."""
    # Imported here: reading data (train, evaluate) must not pay for importing torchvision.datasets.
    from torchvision.datasets import MNIST, FashionMNIST

    return {"mnist": MNIST, "fashion-mnist": FashionMNIST}[dataset]


def resources(dataset: str) -> list[tuple[str, str]]:
    """(file name, MD5) of the four files, as torchvision knows them (or as ``$MNIST_MD5S`` says)."""
    override = os.environ.get(CHECKSUMS_ENV)
    if not override:
        return list(torchvision_dataset(dataset).resources)
    # torchvision names the same four files as FILES, in the same order: no need to import it here.
    names = list(FILES.values())
    try:
        sums = json.loads(Path(override).read_text())
        return [(name, str(sums[name])) for name in names]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"{CHECKSUMS_ENV}={override}: expected a JSON file mapping each of {', '.join(names)} to its MD5 ({exc!r})"
        ) from None


def verified_md5s(data_dir: Path, dataset: str) -> dict[str, str]:
    """``{file name: MD5}`` of the four files in ``data_dir``, each checked against the expected MD5.

    A stage run directly (not through ``dvc repro``) would otherwise use data edited or corrupted
    since the download without noticing.
    """
    sums = {}
    for name, expected in resources(dataset):
        path = Path(data_dir) / name
        try:
            actual = md5sum(path)
        except FileNotFoundError:
            raise _missing(path) from None
        if actual != expected:
            raise DataError(
                f"{path}: MD5 {actual}, expected {expected} (changed since download; rerun the download stage)"
            )
        sums[name] = actual
    return sums


@dataclass(frozen=True)
class Tensors:
    """Normalised images (N, 1, 28, 28) and labels, resident on the training device."""

    x: torch.Tensor
    y: torch.Tensor


def load_train_val(
    data_dir: Path, dataset: str, val_split: float, seed: int, device: torch.device, exclude: np.ndarray | None = None
) -> tuple[Tensors, Tensors]:
    """The 60k training images once, normalised, on ``device``, cut by the seeded 80/20 split; the
    indices ``exclude`` are left out of training after the cut, so the validation images stay the same."""
    split = load_split(data_dir, train=True)
    x = normalise(split.images, dataset).to(device)
    y = split.labels.to(device)
    train_idx, val_idx = split_indices(len(y), val_split, seed)
    if exclude is not None and len(exclude):
        train_idx = train_idx[~torch.isin(train_idx, torch.from_numpy(exclude))]
    train_idx, val_idx = train_idx.to(device), val_idx.to(device)
    return Tensors(x[train_idx], y[train_idx]), Tensors(x[val_idx], y[val_idx])
