"""A tiny MNIST-format data set from scikit-learn's bundled digits (no network, nothing from MNIST)."""

from __future__ import annotations

import gzip
import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

N_TRAIN = 1500  # of the 1797 digits; the rest is the test split


def idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def digits_as_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 8x8 digits (0-16) upscaled to 20x20 and centred in 28x28, as MNIST's digits are, in 0-255."""
    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    images = F.interpolate(images, size=(20, 20), mode="bilinear", align_corners=False)
    images = F.pad(images, (4, 4, 4, 4)).squeeze(1)
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return pixels, digits.target.astype(np.uint8)


def write_tiny_mnist(directory: Path) -> dict[str, str]:
    """Write the four IDX ``.gz`` files into ``directory``; return ``{file name: MD5}``."""
    directory.mkdir(parents=True, exist_ok=True)
    images, labels = digits_as_mnist()
    arrays = {
        "train-images-idx3-ubyte.gz": images[:N_TRAIN],
        "train-labels-idx1-ubyte.gz": labels[:N_TRAIN],
        "t10k-images-idx3-ubyte.gz": images[N_TRAIN:],
        "t10k-labels-idx1-ubyte.gz": labels[N_TRAIN:],
    }
    sums = {}
    for name, array in arrays.items():
        # mtime=0: the same bytes (and MD5) on every machine and every run
        blob = gzip.compress(idx_bytes(array), mtime=0)
        (directory / name).write_bytes(blob)
        sums[name] = hashlib.md5(blob).hexdigest()
    return sums


def write_checksums(sums: dict[str, str], path: Path) -> Path:
    path.write_text(json.dumps(sums))
    return path
