"""The download stage in process: local mirrors, checksums, and real HTTP servers on 127.0.0.1 that
cut, garble or trickle (in a thread: tests/mirror_servers.py)."""

import contextlib
import gzip
import json
import os
import re
import shutil
import socketserver
import stat
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from mirror_servers import QuietHandler, mirror_handler, serving, trickle_handler
from mnist_cnn.core.data import FILES, DataError, load_split, md5sum, read_idx
from mnist_cnn.core.params import DataConfig
from mnist_cnn.stages import download

MNIST = DataConfig("mnist", split_seed=1, drop_test_duplicates=False)


def test_download_from_local_mirror_verifies_every_file(tiny_mirror, tmp_path):
    sums = download.download(MNIST, tmp_path / "raw", mirror=str(tiny_mirror))
    assert sorted(sums) == sorted(FILES.values())
    for name, md5 in sums.items():
        assert md5sum(tmp_path / "raw" / name) == md5
    assert not [p for p in (tmp_path / "raw").iterdir() if p.name.startswith(".")], "temporary files left"
    assert not download.partial_dir(tmp_path / "raw").exists()
    train = load_split(tmp_path / "raw", train=True)
    assert train.images.shape == (1500, 28, 28) and train.labels.shape == (1500,)


def test_mirror_from_environment(tiny_mirror, tmp_path, monkeypatch):
    monkeypatch.setenv("MNIST_MIRROR", str(tiny_mirror))
    download.download(MNIST, tmp_path / "raw")
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
        download.DownloadError,
        match="train-images-idx3-ubyte.gz: no source gave a verified copy.*checksum mismatch",
    ):
        download.download(MNIST, out, mirror=str(bad))
    assert not (out / FILES["train_images"]).exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary files left"
    assert not download.partial_dir(out).exists()


def test_corrupt_file_already_in_place_is_replaced(tiny_mirror, tmp_path):
    out = _corrupt_copy(tiny_mirror, tmp_path / "raw", "flip")
    sums = download.download(MNIST, out, mirror=str(tiny_mirror))
    assert md5sum(out / FILES["train_images"]) == sums[FILES["train_images"]]


def test_offline_fails_fast_naming_what_it_tried(tmp_path, monkeypatch):
    def no_network(url, timeout):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(download.urllib.request, "urlopen", no_network)
    with pytest.raises(download.DownloadError):  # once untimed: the first call pays for lazy imports
        download.download(MNIST, tmp_path / "warm-up")
    start = time.perf_counter()
    with pytest.raises(download.DownloadError) as info:
        download.download(MNIST, tmp_path / "raw")
    message = str(info.value)
    assert time.perf_counter() - start < 5
    assert "\n" not in message
    for mirror in download.default_mirrors("mnist"):
        assert mirror in message
    assert "MNIST_MIRROR=" in message and "--mirror" in message
    assert not (tmp_path / "raw" / FILES["train_images"]).exists()


def test_unreachable_url_mirror_fails_within_seconds(tmp_path):
    start = time.perf_counter()
    with pytest.raises(download.DownloadError, match=r"http://127\.0\.0\.1:9"):
        download.download(MNIST, tmp_path / "raw", mirror="http://127.0.0.1:9", timeout=2)
    assert time.perf_counter() - start < 10


def test_missing_mirror_directory_is_named(tmp_path):
    with pytest.raises(download.DownloadError, match=r"mirror '.*nowhere': not a directory"):
        download.download(MNIST, tmp_path / "raw", mirror=str(tmp_path / "nowhere"))


def test_mirror_under_an_unknown_users_home_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("MNIST_MIRROR", "~no-such-user-here/mnist")
    with pytest.raises(download.DownloadError, match=r"mirror '~no-such-user-here/mnist': cannot expand ~"):
        download.download(MNIST, tmp_path / "raw")
    assert not (tmp_path / "raw" / FILES["test_labels"]).exists()


def test_checksums_are_torchvisions_for_both_datasets(monkeypatch):
    from torchvision.datasets import MNIST as TvMNIST
    from torchvision.datasets import FashionMNIST

    monkeypatch.delenv("MNIST_MD5S")
    assert download.resources("mnist") == list(TvMNIST.resources)
    assert download.resources("fashion-mnist") == list(FashionMNIST.resources)
    assert download.default_mirrors("fashion-mnist") == list(FashionMNIST.mirrors)


def test_bad_checksums_file_is_named(tmp_path, monkeypatch):
    bad = tmp_path / "sums.json"
    bad.write_text(json.dumps({"train-images-idx3-ubyte.gz": "x"}))
    monkeypatch.setenv("MNIST_MD5S", str(bad))
    with pytest.raises(DataError, match=r"MNIST_MD5S=.*sums\.json: expected a JSON file"):
        download.resources("mnist")


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


# Real servers on 127.0.0.1 (a free port each), for the ways a mirror fails in the wild.


class CutOffChunked(QuietHandler):
    """Chunked transfer encoding, the connection closed in the middle of the first chunk."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.write(b"%x\r\n" % 1000 + b"x" * 100)
        self.close_connection = True


class CutOffLength(QuietHandler):
    """A Content-Length of 1000, then 100 bytes and the connection closed."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b"x" * 100)
        self.close_connection = True


def not_http(reply: bytes) -> type[socketserver.StreamRequestHandler]:
    """A server that reads the request, answers ``reply`` (not HTTP at all) and closes."""

    class NotHttp(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            # The whole request is read first: closing with unread input would reset the connection.
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            self.wfile.write(reply)

    return NotHttp


BROKEN = {
    "chunked reply cut off": (CutOffChunked, "reply cut off after 100 bytes"),
    "reply shorter than its Content-Length": (CutOffLength, "reply cut off after 100 bytes (900 more expected)"),
    "not HTTP": (not_http(b"\x00\xffSSH-2.0-OpenSSH\r\n"), "bad HTTP reply: BadStatusLine("),
    "closed without a reply": (not_http(b""), "bad HTTP reply: RemoteDisconnected("),
}


@pytest.mark.parametrize("kind", BROKEN)
def test_broken_reply_is_that_sources_failure_and_the_next_source_is_tried(tiny_mirror, tmp_path, monkeypatch, kind):
    handler, _ = BROKEN[kind]
    with serving(handler) as broken, serving(mirror_handler(tiny_mirror)) as good:
        monkeypatch.setattr(download, "default_mirrors", lambda dataset: [broken, good])
        sums = download.download(MNIST, tmp_path / "raw", timeout=2)
    assert sorted(sums) == sorted(FILES.values())
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == sorted(FILES.values())
    assert not download.partial_dir(tmp_path / "raw").exists()


def test_all_sources_broken_is_one_line_naming_each_and_why(tmp_path, monkeypatch):
    with contextlib.ExitStack() as stack:
        urls = [stack.enter_context(serving(handler)) for handler, _ in BROKEN.values()]
        monkeypatch.setattr(download, "default_mirrors", lambda dataset: urls)
        with pytest.raises(download.DownloadError) as info:
            download.download(MNIST, tmp_path / "raw", timeout=2)
    message = str(info.value)
    assert "\n" not in message and message.startswith("train-images-idx3-ubyte.gz: no source gave a verified copy")
    for url, (_, reason) in zip(urls, BROKEN.values(), strict=True):
        assert f"{url}: {reason}" in message
    assert list((tmp_path / "raw").iterdir()) == []
    assert not download.partial_dir(tmp_path / "raw").exists()


def test_trickling_server_fails_at_the_deadline(tiny_mirror, tmp_path):
    with serving(trickle_handler(tiny_mirror)) as slow:
        start = time.perf_counter()
        with pytest.raises(download.DownloadError, match=rf"{re.escape(slow)}: too slow: \d+ bytes in 1 s\)"):
            download.download(MNIST, tmp_path / "raw", mirror=slow, timeout=2, deadline=1)
        # The deadline is checked as bytes arrive: it ends within deadline + one read's timeout, where
        # the per-read timeout alone would let the trickle go on for days.
        assert time.perf_counter() - start < 3.5
    assert list((tmp_path / "raw").iterdir()) == []
    assert not download.partial_dir(tmp_path / "raw").exists()


def test_downloaded_files_get_the_umasks_mode(tiny_mirror, tmp_path):
    old = os.umask(0o002)
    try:
        with serving(mirror_handler(tiny_mirror)) as good:
            download.download(MNIST, tmp_path / "raw", mirror=good)
    finally:
        os.umask(old)
    for name in FILES.values():
        assert stat.S_IMODE((tmp_path / "raw" / name).stat().st_mode) == 0o664, name
