"""Cross-process locks: one training or evaluation per project directory; one holder of a named lock."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

log = logging.getLogger(__name__)


@contextlib.contextmanager
def stage_lock(model_dir: Path) -> Iterator[None]:
    """One training or evaluation at a time per project directory: two at once would share
    ``models/`` (weights, checkpoint, train.json). A second one waits for the first to finish."""
    Path(model_dir).mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(Path(model_dir) / ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("another training or evaluation is running in %s; waiting for it to finish", model_dir.parent)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()
