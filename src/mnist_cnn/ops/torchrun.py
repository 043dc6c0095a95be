"""Launching a training as N torchrun workers on this machine, and stopping them together."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO

from mnist_cnn.core.errors import ProjectError
from mnist_cnn.core.runtime import usable_cores


class TrainingFailed(ProjectError, RuntimeError):
    """torchrun ended with a non-zero exit: a worker failed (its own error is above in the log)."""


@dataclass(frozen=True)
class Ended:
    """How torchrun ended: its exit code and, for a failed worker, which one and how (its "Root Cause")."""

    code: int
    cause: str | None = None


def launch(processes: int, argv: Sequence[str]) -> Ended:
    """Run ``python -m mnist_cnn ARGV`` as ``processes`` workers on this machine through torchrun
    (``--standalone``: a local rendezvous on a free port).

    The machine's cores are shared out (torchrun alone would give each worker one thread). torchrun
    runs in a session of its own, so an interrupt reaches it once, from here: on Ctrl-C, SIGTERM or SIGHUP
    it is told to stop (SIGINT, which it hands to every worker: the run ends KILLED) and awaited, so
    no worker outlives the stage.

    The workers' lines are passed on as they come (torchrun tees them with a ``[defaultN]:`` prefix,
    taken off here); torchrun's own report of a failed worker, a 40-line traceback and table, is
    read for its root cause instead of printed. Anything else torchrun says is passed on.
    """
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, usable_cores() // processes)))
    with tempfile.TemporaryDirectory(prefix="mnist-cnn-torchrun-") as logs:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={processes}",
            f"--log-dir={logs}",
            "--redirects=3",  # the workers' stdout and stderr go to files under logs ...
            "--tee=3",  # ... and back to torchrun's, each line prefixed with its rank
            "-m",
            "mnist_cnn",
            *argv,
        ]
        torchrun = subprocess.Popen(
            command, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        own_lines: list[str] = []
        readers = [
            threading.Thread(target=_pass_on, args=(torchrun.stdout, sys.stdout, own_lines), daemon=True),
            threading.Thread(target=_pass_on, args=(torchrun.stderr, sys.stderr, own_lines), daemon=True),
        ]
        for reader in readers:
            reader.start()
        try:
            code = torchrun.wait()
        except BaseException:
            _stop(torchrun)
            raise
        finally:
            for reader in readers:
                reader.join(timeout=10)
    cause = root_cause(own_lines)
    if cause is None or code == 0:  # not a failed worker: what torchrun said may be all there is
        sys.stderr.writelines(own_lines)
    return Ended(code, cause)


WORKER_PREFIX = re.compile(r"^\[(?:default|rank)\d+\]:")


def _pass_on(source: IO[str], sink: IO[str], own_lines: list[str]) -> None:
    """Each worker line to ``sink`` without its prefix, as it comes; torchrun's own lines kept aside."""
    for line in source:
        if WORKER_PREFIX.match(line):
            sink.write(WORKER_PREFIX.sub("", line, count=1))
            sink.flush()
        else:
            own_lines.append(line)


def root_cause(torchrun_lines: Sequence[str]) -> str | None:
    """``rank 1 exited with -9 (SIGKILL)`` from torchrun's failure table, or None if it printed none."""
    text = "".join(torchrun_lines)
    block = text.split("Root Cause (first observed failure):", 1)
    if len(block) < 2:
        return None
    rank = re.search(r"^\s*rank\s*:\s*(\d+)", block[1], re.MULTILINE)
    exit_code = re.search(r"^\s*exitcode\s*:\s*(-?\d+)[^\n]*?(\((SIG\w+)\))?\s*$", block[1], re.MULTILINE)
    if not (rank and exit_code):
        return None
    signal_name = f" ({exit_code.group(3)})" if exit_code.group(3) else ""
    return f"rank {rank.group(1)} exited with {exit_code.group(1)}{signal_name}"


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
