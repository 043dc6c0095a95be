"""Cross-process locks: one training or evaluation per project directory; one holder of a named lock."""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from filelock import FileLock, Timeout

from mnist_cnn.core.errors import ProjectError

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


class LockBackend(Protocol):
    """Where a ``NamedLock`` lives: a record with a unique name that only one process can create (a
    registered model on the tracking server, a study in Optuna's database)."""

    def try_create(self) -> bool:
        """Create the record; False if it exists (someone else holds the lock)."""

    def age_s(self) -> float | None:
        """Seconds since the existing record was created; None if it is gone or its age is unknown."""

    def delete(self) -> None:
        """Delete the record this backend last created or looked at (release, or break a stale one);
        nothing if it is gone."""


class LockTimeout(ProjectError, RuntimeError):
    """A named lock stayed held longer than the wait allowed."""


class NamedLock:
    """A mutex for processes on several machines that share only a backend: whoever creates the record
    holds the lock, and deletes it to release. A record older than ``stale_s`` (its holder died without
    releasing) is broken. A waiter gives up after ``wait_s`` with ``error(<one line>)``. Reusable, not
    reentrant."""

    def __init__(
        self,
        backend: LockBackend,
        label: str,
        wait_s: float = 300.0,
        stale_s: float = 120.0,
        error: type[Exception] = LockTimeout,
    ) -> None:
        self.backend, self.label = backend, label  # label: what the messages call it, e.g. "study lock 'x'"
        self.wait_s, self.stale_s, self.error = wait_s, stale_s, error

    def __enter__(self) -> None:
        deadline = time.monotonic() + self.wait_s
        while not self.backend.try_create():
            age = self.backend.age_s()
            broken = age is not None and age > self.stale_s
            if broken:
                log.warning("breaking the stale %s (held for over %.0f s)", self.label, self.stale_s)
                self.backend.delete()
            if time.monotonic() > deadline:
                raise self.error(f"{self.label} held for over {self.wait_s:.0f} s; delete it if stale")
            if not broken:
                time.sleep(0.1 + random.random() * 0.3)  # jittered: waiters do not retry in step

    def __exit__(self, *exc_info: object) -> None:
        self.backend.delete()
