"""Download stage: fetch the four IDX files of MNIST or Fashion-MNIST and verify their MD5s.

Mirrors and checksums are torchvision's. ``MNIST_MIRROR`` (or ``--mirror``) points at a local
directory or a base URL instead, for machines behind a firewall.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from torchvision.datasets import MNIST, FashionMNIST

from .config import DataConfig
from .data import md5sum

log = logging.getLogger(__name__)

MIRROR_ENV = "MNIST_MIRROR"
# A JSON file {file name: MD5} that replaces torchvision's checksums: for private variants of the data
# (the test suite's tiny data set). The files are verified all the same, against these sums.
CHECKSUMS_ENV = "MNIST_MD5S"
_DATASETS = {"mnist": MNIST, "fashion-mnist": FashionMNIST}


class DownloadError(RuntimeError):
    """No source delivered a file with the expected checksum."""


def resources(dataset: str) -> list[tuple[str, str]]:
    """(file name, MD5) of the four files, as torchvision knows them (or as ``$MNIST_MD5S`` says)."""
    known = list(_DATASETS[dataset].resources)
    override = os.environ.get(CHECKSUMS_ENV)
    if not override:
        return known
    try:
        sums = json.loads(Path(override).read_text())
        return [(name, str(sums[name])) for name, _ in known]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DownloadError(
            f"{CHECKSUMS_ENV}={override}: expected a JSON file mapping each of "
            f"{', '.join(name for name, _ in known)} to its MD5 ({exc!r})"
        ) from None


def default_mirrors(dataset: str) -> list[str]:
    return list(_DATASETS[dataset].mirrors)


def _is_url(source: str) -> bool:
    return "://" in source


def _fetch(source: str, filename: str, dest: Path, timeout: float) -> None:
    if _is_url(source):
        url = source.rstrip("/") + "/" + filename
        with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as out:
            shutil.copyfileobj(response, out)
    else:
        shutil.copyfile(Path(source).expanduser() / filename, dest)


def _fetch_verified(sources: list[str], filename: str, md5: str, out_dir: Path, timeout: float) -> None:
    """Fetch ``filename`` from the first source whose copy has the right MD5, then move it into place."""
    failures = []
    for source in sources:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{filename}.", dir=out_dir)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            _fetch(source, filename, tmp, timeout)
            actual = md5sum(tmp)
            if actual != md5:
                failures.append(f"{source}: checksum mismatch (MD5 {actual}, expected {md5})")
                continue
            os.replace(tmp, out_dir / filename)
            log.info("%s: verified from %s", filename, source)
            return
        except (OSError, urllib.error.URLError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc.strerror or exc
            failures.append(f"{source}: {reason}")
        finally:
            tmp.unlink(missing_ok=True)
    raise DownloadError(
        f"{filename}: no source gave a verified copy (tried {'; '.join(failures)}). "
        f"To use a local copy, set {MIRROR_ENV}=/path/to/dir holding the four .gz files "
        f"(or a base URL), or pass --mirror"
    )


def download(cfg: DataConfig, out_dir: Path, mirror: str | None = None, timeout: float = 5.0) -> dict[str, str]:
    """Make ``out_dir`` hold the four verified files; return ``{file name: MD5}``.

    ``mirror`` (else ``$MNIST_MIRROR``) replaces torchvision's mirrors. A file already present with
    the right MD5 is kept; one with any other content is replaced, never used.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mirror = mirror or os.environ.get(MIRROR_ENV) or None
    if mirror and not _is_url(mirror) and not Path(mirror).expanduser().is_dir():
        raise DownloadError(f"mirror {mirror!r}: not a directory (nor a URL with a scheme such as https://)")
    sources = [mirror] if mirror else default_mirrors(cfg.dataset)
    verified = {}
    for filename, md5 in resources(cfg.dataset):
        target = out_dir / filename
        if not (target.is_file() and md5sum(target) == md5):
            _fetch_verified(sources, filename, md5, out_dir, timeout)
        verified[filename] = md5
    return verified
