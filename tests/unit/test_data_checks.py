"""``verified_md5s``: a stage run directly (not through ``dvc repro``) refuses data changed since download."""

import json
import shutil
from pathlib import Path

import pytest

from mnist_cnn.core import data
from mnist_cnn.core.data import FILES, DataError, verified_md5s
from mnist_cnn.stages import download


def _copy(tiny_mirror: Path, dest: Path) -> Path:
    shutil.copytree(tiny_mirror, dest)
    return dest


def test_good_data_gives_each_files_md5(tiny_mirror):
    expected = json.loads((tiny_mirror.parent / "md5s.json").read_text())
    assert verified_md5s(tiny_mirror, "mnist") == expected
    assert list(expected) == list(FILES.values())


@pytest.mark.parametrize("name", FILES.values())
def test_a_flipped_byte_is_named_with_both_md5s(tiny_mirror, tmp_path, name):
    raw = _copy(tiny_mirror, tmp_path / "raw")
    victim = raw / name
    blob = bytearray(victim.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    victim.write_bytes(bytes(blob))
    expected = json.loads((tiny_mirror.parent / "md5s.json").read_text())[name]
    with pytest.raises(DataError) as info:
        verified_md5s(raw, "mnist")
    message = str(info.value)
    assert message.startswith(f"{victim}: MD5 {data.md5sum(victim)}, expected {expected} ")
    assert message.endswith("(changed since download; rerun the download stage)")


def test_a_missing_file_says_to_download(tiny_mirror, tmp_path):
    raw = _copy(tiny_mirror, tmp_path / "raw")
    (raw / FILES["test_labels"]).unlink()
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz: file not found \(run the download stage first\)"):
        verified_md5s(raw, "mnist")


def test_a_bad_checksums_file_is_named(tiny_mirror, tmp_path, monkeypatch):
    bad = tmp_path / "sums.json"
    bad.write_text("not json")
    monkeypatch.setenv("MNIST_MD5S", str(bad))
    with pytest.raises(DataError, match=r"MNIST_MD5S=.*sums\.json: expected a JSON file"):
        verified_md5s(tiny_mirror, "mnist")


@pytest.mark.parametrize("dataset", ["mnist", "fashion-mnist"])
def test_download_and_the_check_share_torchvisions_checksums(dataset, monkeypatch):
    monkeypatch.delenv("MNIST_MD5S")
    assert download.resources is data.resources
    # The override (MNIST_MD5S) is read by FILES' names: they must be torchvision's, in its order.
    assert [name for name, _ in data.resources(dataset)] == list(FILES.values())
