"""Launching a training as N torchrun workers on this machine, and stopping them together."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

from mnist_cnn.core.errors import ProjectError
from mnist_cnn.core.runtime import usable_cores


class TrainingFailed(ProjectError, RuntimeError):
    """torchrun ended with a non-zero exit: a worker failed (its own error is above in the log)."""


def launch(processes: int, argv: Sequence[str]) -> int:
    """Run ``python -m mnist_cnn ARGV`` as ``processes`` workers on this machine through torchrun
    (``--standalone``: a local rendezvous on a free port); return torchrun's exit code.

    The machine's cores are shared out (torchrun alone would give each worker one thread). torchrun
    runs in a session of its own, so an interrupt reaches it once, from here: on Ctrl-C, SIGTERM or SIGHUP
    it is told to stop (SIGINT, which it hands to every worker: the run ends KILLED) and awaited, so
    no worker outlives the stage.
    """
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, usable_cores() // processes)))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={processes}",
        "-m",
        "mnist_cnn",
        *argv,
    ]
    torchrun = subprocess.Popen(command, env=env, start_new_session=True)
    try:
        return torchrun.wait()
    except BaseException:
        _stop(torchrun)
        raise


# torchrun gives its workers 30 s to end after a signal before it kills them.
STOP_GRACE_S = 60.0


def _stop(torchrun: subprocess.Popen) -> None:
    """Stop torchrun and its workers; wait for them (a second interrupt does not cut the wait short)."""
    if torchrun.poll() is None:
        torchrun.send_signal(signal.SIGINT)
    deadline = time.monotonic() + STOP_GRACE_S
    while torchrun.poll() is None:
        try:
            torchrun.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(torchrun.pid, signal.SIGKILL)  # the whole session: torchrun and its workers
            torchrun.wait()
        except KeyboardInterrupt:
            continue
