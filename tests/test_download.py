import gzip
import json
import shutil
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from mnist_cnn import download as dl
from mnist_cnn.config import DataConfig
from mnist_cnn.data import FILES, DataError, load_split, md5sum, read_idx

MNIST = DataConfig("mnist")


def test_download_from_local_mirror_verifies_every_file(tiny_mirror, tmp_path):
    sums = dl.download(MNIST, tmp_path / "raw", mirror=str(tiny_mirror))
    assert sorted(sums) == sorted(FILES.values())
    for name, md5 in sums.items():
        assert md5sum(tmp_path / "raw" / name) == md5
    assert not [p for p in (tmp_path / "raw").iterdir() if p.name.startswith(".")], "temporary files left"
    train = load_split(tmp_path / "raw", train=True)
    assert train.images.shape == (1500, 28, 28) and train.labels.shape == (1500,)


def test_mirror_from_environment(tiny_mirror, tmp_path, monkeypatch):
    monkeypatch.setenv("MNIST_MIRROR", str(tiny_mirror))
    dl.download(MNIST, tmp_path / "raw")
    assert (tmp_path / "raw" / FILES["test_labels"]).is_file()


def _corrupt_copy(tiny_mirror: Path, dest: Path, how: str) -> Path:
    shutil.copytree(tiny_mirror, dest)
    victim = dest / FILES["train_images"]
    blob = bytearray(victim.read_bytes())
    if how == "flip":
        blob[len(blob) // 2] ^= 0x01
    else:
        blob = blob[: len(blob) // 2]
    victim.write_bytes(bytes(blob))
    return dest


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_corrupt_mirror_file_is_rejected_and_never_used(tiny_mirror, tmp_path, how):
    bad = _corrupt_copy(tiny_mirror, tmp_path / "bad", how)
    out = tmp_path / "raw"
    with pytest.raises(
        dl.DownloadError,
        match="train-images-idx3-ubyte.gz: no source gave a verified copy.*checksum mismatch",
    ):
        dl.download(MNIST, out, mirror=str(bad))
    assert not (out / FILES["train_images"]).exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary files left"


def test_corrupt_file_already_in_place_is_replaced(tiny_mirror, tmp_path):
    out = _corrupt_copy(tiny_mirror, tmp_path / "raw", "flip")
    sums = dl.download(MNIST, out, mirror=str(tiny_mirror))
    assert md5sum(out / FILES["train_images"]) == sums[FILES["train_images"]]


def test_offline_fails_fast_naming_what_it_tried(tmp_path, monkeypatch):
    def no_network(url, timeout):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(dl.urllib.request, "urlopen", no_network)
    start = time.perf_counter()
    with pytest.raises(dl.DownloadError) as info:
        dl.download(MNIST, tmp_path / "raw")
    message = str(info.value)
    assert time.perf_counter() - start < 5
    assert "\n" not in message
    for mirror in dl.default_mirrors("mnist"):
        assert mirror in message
    assert "MNIST_MIRROR=" in message and "--mirror" in message
    assert not (tmp_path / "raw" / FILES["train_images"]).exists()


def test_unreachable_url_mirror_fails_within_seconds(tmp_path):
    start = time.perf_counter()
    with pytest.raises(dl.DownloadError, match=r"http://127\.0\.0\.1:9"):
        dl.download(MNIST, tmp_path / "raw", mirror="http://127.0.0.1:9", timeout=2)
    assert time.perf_counter() - start < 10


def test_missing_mirror_directory_is_named(tmp_path):
    with pytest.raises(dl.DownloadError, match=r"mirror '.*nowhere': not a directory"):
        dl.download(MNIST, tmp_path / "raw", mirror=str(tmp_path / "nowhere"))


def test_checksums_are_torchvisions_for_both_datasets(monkeypatch):
    from torchvision.datasets import MNIST as TvMNIST
    from torchvision.datasets import FashionMNIST

    monkeypatch.delenv("MNIST_MD5S")
    assert dl.resources("mnist") == list(TvMNIST.resources)
    assert dl.resources("fashion-mnist") == list(FashionMNIST.resources)
    assert dl.default_mirrors("fashion-mnist") == list(FashionMNIST.mirrors)


def test_bad_checksums_file_is_named(tmp_path, monkeypatch):
    bad = tmp_path / "sums.json"
    bad.write_text(json.dumps({"train-images-idx3-ubyte.gz": "x"}))
    monkeypatch.setenv("MNIST_MD5S", str(bad))
    with pytest.raises(dl.DownloadError, match=r"MNIST_MD5S=.*sums\.json: expected a JSON file"):
        dl.resources("mnist")


def test_read_idx_rejects_truncated_and_foreign_files(tmp_path):
    good = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    from tinydata import idx_bytes

    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(idx_bytes(good)))
    assert np.array_equal(read_idx(path), good)
    path.write_bytes(gzip.compress(idx_bytes(good)[:-10]))
    with pytest.raises(DataError, match=r"x\.gz: expected 1584 bytes for shape \(2, 28, 28\), found 1574"):
        read_idx(path)
    path.write_bytes(gzip.compress(b"PK\x03\x04 not idx"))
    with pytest.raises(DataError, match="bad magic number"):
        read_idx(path)
    path.write_bytes(b"not gzip")
    with pytest.raises(DataError, match="not a readable gzip file"):
        read_idx(path)
