"""``ops.lock.NamedLock``'s algorithm on an in-memory backend: one holder at a time, a stale record
broken after ``stale_s``, and a waiter that gives up after ``wait_s`` with one clear error."""

from __future__ import annotations

import threading
import time

import pytest

from mnist_cnn.ops.lock import LockTimeout, NamedLock


class MemoryRecord:
    """The lock's record, shared by every backend made on it (as a server's registry or a database is)."""

    def __init__(self) -> None:
        self.guard = threading.Lock()
        self.created: float | None = None  # time.time() of the holder's creation; None: free
        self.serial = 0  # which creation the record is, so a backend deletes only the one it saw


class MemoryBackend:
    def __init__(self, record: MemoryRecord) -> None:
        self.record, self.seen = record, None

    def try_create(self) -> bool:
        with self.record.guard:
            if self.record.created is not None:
                return False
            self.record.created, self.record.serial = time.time(), self.record.serial + 1
            self.seen = self.record.serial
            return True

    def age_s(self) -> float | None:
        with self.record.guard:
            if self.record.created is None:
                return None
            self.seen = self.record.serial
            return time.time() - self.record.created

    def delete(self) -> None:
        with self.record.guard:
            if self.record.serial == self.seen:
                self.record.created = None


def test_one_holder_at_a_time_and_each_waiter_gets_its_turn():
    record, inside, most, order = MemoryRecord(), [0], [0], []

    def hold(name: str) -> None:
        with NamedLock(MemoryBackend(record), "test lock", wait_s=30, stale_s=60):
            inside[0] += 1
            most[0] = max(most[0], inside[0])
            order.append(name)
            time.sleep(0.2)
            inside[0] -= 1

    threads = [threading.Thread(target=hold, args=(name,)) for name in "abc"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(order) == ["a", "b", "c"] and most[0] == 1
    assert record.created is None  # released by the last holder


def test_the_lock_is_reusable_and_released_on_an_error():
    record = MemoryRecord()
    lock = NamedLock(MemoryBackend(record), "test lock", wait_s=1, stale_s=60)
    with pytest.raises(ValueError), lock:
        raise ValueError("inside")
    assert record.created is None
    with lock:
        assert record.created is not None
    assert record.created is None


def test_a_stale_holder_is_broken_after_stale_s(caplog):
    record = MemoryRecord()
    dead = MemoryBackend(record)
    assert dead.try_create()  # a holder that died without releasing
    started = time.monotonic()
    with NamedLock(MemoryBackend(record), "test lock 'x'", wait_s=30, stale_s=0.5):
        waited = time.monotonic() - started
        assert record.serial == 2  # our own record, not the dead one's
        dead.delete()  # a late release by the old holder does not delete the record created since
        assert record.created is not None
    assert 0.5 <= waited < 5
    assert "breaking the stale test lock 'x' (held for over 0 s)" in caplog.text
    assert record.created is None


def test_a_live_holder_is_waited_for_then_the_waiter_gives_up_with_one_line():
    record = MemoryRecord()
    holder = MemoryBackend(record)
    assert holder.try_create()
    started = time.monotonic()
    with pytest.raises(LockTimeout) as caught, NamedLock(MemoryBackend(record), "test lock 'x'", 0.6, 60):
        pass
    assert 0.6 <= time.monotonic() - started < 5
    assert str(caught.value) == "test lock 'x' held for over 1 s; delete it if stale"
    assert record.created is not None and record.serial == 1  # the holder's record is left alone


def test_the_error_type_is_the_callers():
    class StudyError(RuntimeError):
        pass

    record = MemoryRecord()
    assert MemoryBackend(record).try_create()
    with pytest.raises(StudyError, match="^study lock held for over 0 s; delete it if stale$"):
        with NamedLock(MemoryBackend(record), "study lock", wait_s=0.2, stale_s=60, error=StudyError):
            pass
