"""What a stop signal means to a stage: SIGTERM and SIGHUP unwind like Ctrl-C; ending a run holds them."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

from mnist_cnn.core.errors import ProjectError
from mnist_cnn.core.world import under_torchrun


class WorkerStopped(ProjectError, RuntimeError):
    """torchrun stopped this worker: another rank failed (or the whole job was stopped)."""


def stop_signal_error(signum: int) -> BaseException:
    """What SIGTERM means here: under torchrun, that a peer failed and the agent is ending the rest
    (the run ends FAILED); otherwise, and SIGHUP always (the terminal closed, under a torchrun started
    by hand too), an interrupt like Ctrl-C (the run ends KILLED)."""
    if under_torchrun() and signum == signal.SIGTERM:
        return WorkerStopped(f"stopped by torchrun (signal {signum}): another rank of this training failed")
    return KeyboardInterrupt(f"signal {signum}")


def stop_signals() -> list[int]:
    """The signals that end a stage like Ctrl-C: SIGTERM (kill, dvc queue kill, a scheduler) and SIGHUP
    (the terminal closed), less one that is ignored (SIGHUP under nohup stays ignored)."""
    wanted = [signal.SIGTERM, *([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])]
    return [sig for sig in wanted if signal.getsignal(sig) is not signal.SIG_IGN]


# The stop signals received inside the outermost stop_signals_interrupt block (cleared as it starts and
# once it has ended).
_received: list[int] = []
_blocks = 0


def _raise_stop(signum, frame):  # noqa: ARG001
    _received.append(signum)
    raise stop_signal_error(signum)


@contextlib.contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """Inside the block the ``stop_signals`` raise ``stop_signal_error`` (KeyboardInterrupt, or WorkerStopped
    under torchrun), so temporary files are removed and an MLflow run ends KILLED (FAILED)."""
    global _blocks
    if not _blocks:
        _received.clear()
    previous = {sig: signal.signal(sig, _raise_stop) for sig in stop_signals()}
    _blocks += 1
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _blocks -= 1
        if not _blocks:
            _received.clear()


def raise_if_stopped() -> None:
    """Raise again a stop signal received in the block whose exception was lost. Python runs a handler
    wherever the main thread is, a finalizer (``__del__``, a weakref callback) included, and drops what
    a finalizer raises ("Exception ignored in ..."): a training then went on after its SIGHUP. Called
    at each epoch's end."""
    if _received:
        raise stop_signal_error(_received[0])


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP (one ignored, as under nohup, stays ignored) until the block is done:
    a second Ctrl-C, or the hang-up a torchrun agent passes on after the terminal's, must not break off
    ending a run.

    Held by a handler that notes them, not by blocking them (``pthread_sigmask``): a main thread that
    blocks them makes the kernel hand them to MLflow's logging threads instead, and ending the run then
    hung at times joining its async-logging thread. The first one held is raised again on leaving.
    """
    held: list[int] = []
    stops = [signal.SIGINT, *stop_signals()]
    previous = {sig: signal.signal(sig, lambda signum, frame: held.append(signum)) for sig in stops}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if held:
            signal.raise_signal(held[0])
