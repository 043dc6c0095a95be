"""The data checks on files made for each fault (tiny IDX files): one line naming the file, the check and
the numbers; test images copied into the training file found, and left out of training on request."""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest
import torch

from mnist_cnn.core.data import DataError, load_train_val, read_idx, split_indices
from mnist_cnn.core.data_checks import DataReport, check_data, copies_between_splits, training_exclusions
from tinydata import idx_bytes

TRAIN_IMAGES, TRAIN_LABELS = "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"
TEST_IMAGES = "t10k-images-idx3-ubyte.gz"


@pytest.fixture
def data(tmp_path, tiny_mirror):
    shutil.copytree(tiny_mirror, tmp_path / "raw")
    return tmp_path / "raw"


def rewrite(path, change) -> None:
    array = read_idx(path).copy()
    path.write_bytes(gzip.compress(idx_bytes(change(array)), mtime=0))


def test_the_tiny_data_passes_and_is_reported(data):
    assert check_data(data) == DataReport(
        train_images=1500, test_images=297, smallest_class_share=9.09, largest_class_share=11.11, test_duplicates=0
    )


@pytest.mark.parametrize(
    ("file", "change", "says"),
    [
        (
            TRAIN_LABELS,
            lambda a: np.where(np.arange(len(a)) == 7, 11, a),
            "labels: 1 outside 0-9, the first 11 at index 7",
        ),
        (
            TRAIN_IMAGES,
            lambda a: (a > 127).astype(np.uint8),
            "pixel range: the brightest pixel is 1, expected up to 255",
        ),
        (
            TRAIN_LABELS,
            lambda a: np.where(a == 3, 0, a),
            "class balance: digit 3 is 0.0% of the split, expected 5-20% each",
        ),
        (
            TEST_IMAGES,
            lambda a: np.pad(a, ((0, 0), (2, 2), (2, 2))),
            "images of shape (297, 32, 32), expected (N, 28, 28)",
        ),
    ],
)
def test_a_failed_check_is_one_line_naming_the_file_the_check_and_the_numbers(data, file, change, says):
    rewrite(data / file, change)
    with pytest.raises(DataError) as caught:
        check_data(data)
    assert str(caught.value).startswith(f"{data / file}: ") and says in str(caught.value), caught.value
    assert "\n" not in str(caught.value)


def test_test_images_copied_into_the_training_file_are_found_and_left_out_on_request(data):
    test = read_idx(data / TEST_IMAGES)
    rewrite(data / TRAIN_IMAGES, lambda a: np.concatenate([a[:-3], test[[5, 50, 100]]]))
    train_hits, test_hits = copies_between_splits(read_idx(data / TRAIN_IMAGES), read_idx(data / TEST_IMAGES))
    assert train_hits.tolist() == [1497, 1498, 1499] and test_hits.tolist() == [5, 50, 100]
    assert check_data(data).test_duplicates == 3
    assert training_exclusions(data, False) is None
    exclude = training_exclusions(data, True)
    kept, val = load_train_val(data, "mnist", 0.2, 1, torch.device("cpu"), exclude)
    every, same_val = load_train_val(data, "mnist", 0.2, 1, torch.device("cpu"))
    train_part, _ = split_indices(1500, 0.2, 1)
    in_training = int(np.isin(exclude, train_part.numpy()).sum())
    assert in_training > 0
    assert len(every.y) - len(kept.y) == in_training  # the copies in the training part, and no other image
    assert torch.equal(val.y, same_val.y) and torch.equal(val.x, same_val.x)  # validation unchanged
