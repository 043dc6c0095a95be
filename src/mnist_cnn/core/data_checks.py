"""Checks of the data before any training: shapes, labels, pixel range and class balance of each split,
and test images that also appear, byte for byte, in the training file (a model that trained on them
would be tested on what it has seen). A failed check is one line naming the file, the check and the
numbers; the results go into the training run with its datasets."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from mnist_cnn.core.data import FILES, DataError, Tensors, load_train_val, read_idx
from mnist_cnn.core.model import IMAGE_SIZE, NUM_CLASSES
from mnist_cnn.core.params import Params

IMAGE_SHAPE = (IMAGE_SIZE, IMAGE_SIZE)
# Each class's share of a split: MNIST's lie between 8.92% and 11.35%, Fashion-MNIST's are 10% each.
CLASS_SHARE = (0.05, 0.20)
# The brightest pixel of a split: 255 in MNIST; a split written from 0-1 floats would top out at 1.
MIN_BRIGHTEST = 128


@dataclass(frozen=True)
class DataReport:
    train_images: int
    test_images: int
    smallest_class_share: float  # over both splits, in percent
    largest_class_share: float
    test_duplicates: int  # test images with an exact copy in the training file

    def metrics(self) -> dict[str, float]:
        return {f"data.{key}": float(value) for key, value in asdict(self).items()}


def check_data(data_dir: Path) -> DataReport:
    """Read the four files and check them; raise ``DataError`` at the first check that fails."""
    shares = []
    images = {}  # read once: the duplicates check below compares the two splits' images
    for prefix in ("train", "test"):
        images_file, labels_file = (Path(data_dir) / FILES[f"{prefix}_{kind}"] for kind in ("images", "labels"))
        images[prefix], labels = read_idx(images_file), read_idx(labels_file)
        check_images(images[prefix], images_file)
        shares.append(check_labels(labels, len(images[prefix]), labels_file))
    duplicates = len(copies_between_splits(images["train"], images["test"])[1])
    return DataReport(
        train_images=len(images["train"]),
        test_images=len(images["test"]),
        smallest_class_share=round(100 * float(min(s.min() for s in shares)), 2),
        largest_class_share=round(100 * float(max(s.max() for s in shares)), 2),
        test_duplicates=duplicates,
    )


def check_images(images: np.ndarray, path: Path) -> None:
    if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE or len(images) == 0:
        raise DataError(f"{path}: images of shape {images.shape}, expected (N, 28, 28) with N > 0")
    brightest = int(images.max())
    if brightest < MIN_BRIGHTEST:
        raise DataError(
            f"{path}: pixel range: the brightest pixel is {brightest}, expected up to 255 (raw 0-255 pixels, "
            "not scaled to 0-1)"
        )


def check_labels(labels: np.ndarray, n_images: int, path: Path) -> np.ndarray:
    """The share of each class (checked against ``CLASS_SHARE``)."""
    if labels.ndim != 1 or len(labels) != n_images:
        raise DataError(f"{path}: {labels.shape} labels for {n_images} images, expected one label per image")
    wrong = np.flatnonzero(labels >= NUM_CLASSES)
    if len(wrong):
        raise DataError(
            f"{path}: labels: {len(wrong)} outside 0-9, the first {int(labels[wrong[0]])} at index {int(wrong[0])}"
        )
    shares = np.bincount(labels, minlength=NUM_CLASSES) / len(labels)
    low, high = CLASS_SHARE
    for digit in (int(shares.argmin()), int(shares.argmax())):
        if not low <= shares[digit] <= high:
            raise DataError(
                f"{path}: class balance: digit {digit} is {100 * shares[digit]:.1f}% of the split, expected"
                f" {100 * low:.0f}-{100 * high:.0f}% each"
            )
    return shares


def training_and_validation(params: Params, data_dir: Path, device: torch.device) -> tuple[Tensors, Tensors]:
    """The cut ``params`` ask for (``train.val_split``, ``data.split_seed``), on ``device``, the training part
    without the test images' copies under ``data.drop_test_duplicates``."""
    exclude = training_exclusions(data_dir, params.data.drop_test_duplicates)
    split = (params.train.val_split, params.data.split_seed)
    return load_train_val(data_dir, params.data.dataset, *split, device, exclude)


def training_exclusions(data_dir: Path, drop_test_duplicates: bool) -> np.ndarray | None:
    """Indices of the training file to leave out of training (``data.drop_test_duplicates``), or None."""
    if not drop_test_duplicates:
        return None
    train, test = (read_idx(Path(data_dir) / FILES[f"{prefix}_images"]) for prefix in ("train", "test"))
    return copies_between_splits(train, test)[0]


def copies_between_splits(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(indices in ``train``, indices in ``test``) of the images that are in both, byte for byte."""
    in_test = {image.tobytes() for image in test}
    train_hits = np.array([i for i, image in enumerate(train) if image.tobytes() in in_test], dtype=np.int64)
    in_train = {train[i].tobytes() for i in train_hits}
    test_hits = np.array([j for j, image in enumerate(test) if image.tobytes() in in_train], dtype=np.int64)
    return train_hits, test_hits
