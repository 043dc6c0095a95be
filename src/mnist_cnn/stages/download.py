"""Download stage: fetch the four IDX files of MNIST or Fashion-MNIST and verify their MD5s.

Mirrors are torchvision's; the expected MD5s come from ``data.resources``, which the other stages check
the data against too. ``MNIST_MIRROR`` (or ``--mirror``) points at a local directory or a base URL
instead, for machines behind a firewall.

Files are fetched into a directory beside the output directory (``data/.raw.partial``), never into it:
``data/raw`` is a DVC output and must hold only verified files, even after a download was killed.
"""

from __future__ import annotations

import http.client
import logging
import os
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import BinaryIO

from mnist_cnn.core.data import md5sum, resources, torchvision_dataset
from mnist_cnn.core.errors import ProjectError
from mnist_cnn.core.files import is_url, publish
from mnist_cnn.core.params import DataConfig

log = logging.getLogger(__name__)


MIRROR_ENV = "MNIST_MIRROR"


_BLOCK = 1 << 16


class DownloadError(ProjectError, RuntimeError):
    """No source delivered a file with the expected checksum."""


class _SourceFailed(Exception):
    """Why one source gave no usable copy of a file (the next source is tried)."""


def default_mirrors(dataset: str) -> list[str]:
    return list(torchvision_dataset(dataset).mirrors)


def partial_dir(out_dir: Path) -> Path:
    """Where files wait until verified: beside ``out_dir``, so on the same filesystem (the move into
    place is an atomic rename) but outside the DVC output."""
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}.partial"


def _copy_body(response: BinaryIO, out: BinaryIO, started: float, deadline: float) -> None:
    """Copy the reply's body to ``out``; it must come whole and within ``deadline`` s of ``started``."""
    received = 0
    try:
        # read1 returns after one socket read, so the deadline is checked while bytes trickle in:
        # urlopen's timeout is per read, and a server sending a byte a second never reaches it.
        while block := response.read1(_BLOCK):
            out.write(block)
            received += len(block)
            if time.monotonic() - started > deadline:
                raise _SourceFailed(f"too slow: {received} bytes in {deadline:g} s")
    except http.client.IncompleteRead:
        raise _SourceFailed(f"reply cut off after {received} bytes") from None
    # read1 just returns b"" when the connection closes before Content-Length bytes came.
    missing = getattr(response, "length", None)
    if missing:
        raise _SourceFailed(f"reply cut off after {received} bytes ({missing} more expected)")


def _fetch(source: str, filename: str, dest: Path, timeout: float, deadline: float) -> None:
    if is_url(source):
        url = source.rstrip("/") + "/" + filename
        started = time.monotonic()
        with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as out:
            _copy_body(response, out, started, deadline)
    else:
        shutil.copyfile(_local_mirror(source) / filename, dest)


def _local_mirror(mirror: str) -> Path:
    """A mirror folder, ``~`` expanded as a shell would."""
    try:
        return Path(mirror).expanduser()
    except RuntimeError as exc:  # `~nosuchuser/...`, or no home folder
        raise DownloadError(f"mirror {mirror!r}: cannot expand ~ ({exc})") from None


def _reason(exc: Exception) -> str:
    """One short line saying why a source failed."""
    if isinstance(exc, http.client.HTTPException):
        # Not HTTP at all (BadStatusLine, RemoteDisconnected) or broken HTTP: only the repr says which.
        text = f"bad HTTP reply: {exc!r}"
    else:
        text = str(getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc)
    return " ".join(text.split())[:200]


def _fetch_verified(
    sources: list[str], filename: str, md5: str, out_dir: Path, work_dir: Path, timeout: float, deadline: float
) -> None:
    """Fetch ``filename`` from the first source whose copy has the right MD5, then move it into place."""
    failures = []
    for source in sources:
        fd, tmp_name = tempfile.mkstemp(prefix=f"{filename}.", dir=work_dir)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            _fetch(source, filename, tmp, timeout, deadline)
            actual = md5sum(tmp)
            if actual != md5:
                failures.append(f"{source}: checksum mismatch (MD5 {actual}, expected {md5})")
                continue
            publish(tmp, out_dir / filename)
            log.info("%s: verified from %s", filename, source)
            return
        # HTTPException is not an OSError: a reply cut off or a server not speaking HTTP is one
        # source's failure like any other, not the end of the download.
        except (_SourceFailed, http.client.HTTPException, OSError, ValueError) as exc:
            failures.append(f"{source}: {_reason(exc)}")
        finally:
            tmp.unlink(missing_ok=True)
    raise DownloadError(
        f"{filename}: no source gave a verified copy (tried {'; '.join(failures)}). "
        f"To use a local copy, set {MIRROR_ENV}=/path/to/dir holding the four .gz files "
        f"(or a base URL), or pass --mirror"
    )


def download(
    cfg: DataConfig, out_dir: Path, mirror: str | None = None, timeout: float = 5.0, deadline: float = 120.0
) -> dict[str, str]:
    """Make ``out_dir`` hold the four verified files; return ``{file name: MD5}``.

    ``mirror`` (else ``$MNIST_MIRROR``) replaces torchvision's mirrors. A file already present with
    the right MD5 is kept; one with any other content is replaced, never used. ``timeout`` bounds each
    socket read, ``deadline`` the whole transfer of one file from one source.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mirror = mirror or os.environ.get(MIRROR_ENV) or None
    if mirror and not is_url(mirror) and not _local_mirror(mirror).is_dir():
        raise DownloadError(f"mirror {mirror!r}: not a directory (nor a URL with a scheme such as https://)")
    sources = [mirror] if mirror else default_mirrors(cfg.dataset)
    expected = resources(cfg.dataset)
    work_dir = partial_dir(out_dir)
    # A run killed outright (SIGKILL, power loss) cannot clean up after itself: the next one does.
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir()
    verified = {}
    try:
        for filename, md5 in expected:
            target = out_dir / filename
            if not (target.is_file() and md5sum(target) == md5):
                _fetch_verified(sources, filename, md5, out_dir, work_dir, timeout, deadline)
            verified[filename] = md5
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return verified
