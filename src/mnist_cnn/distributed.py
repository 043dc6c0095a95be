"""Data-parallel training across processes: the world torchrun describes, and launching through it.

torchrun (``torch.distributed.run``) starts the processes and sets RANK, WORLD_SIZE and LOCAL_RANK;
this module only reads them, joins the process group and sums (or shares) values across it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs to MLflow and writes models/ and reports/."""
        return self.rank == 0


SINGLE = World()


def from_env() -> World:
    """The world torchrun set up for this process (a single process when not under torchrun)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return SINGLE
    return World(rank=int(os.environ["RANK"]), size=size, local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def under_torchrun() -> bool:
    return from_env().distributed


def device_for(world: World, device: torch.device) -> torch.device:
    """One GPU per process: LOCAL_RANK picks it."""
    if world.distributed and device.type == "cuda":
        torch.cuda.set_device(world.local_rank)
        return torch.device("cuda", world.local_rank)
    return device


@contextlib.contextmanager
def process_group(world: World, device: torch.device) -> Iterator[None]:
    """Join the group (NCCL on GPUs, Gloo on CPUs) for the block; nothing to do for one process."""
    if not world.distributed:
        yield
        return
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def all_sum(values: torch.Tensor, world: World) -> torch.Tensor:
    """``values`` summed over every process (in place); unchanged for one process."""
    if world.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def from_main(value: Any, world: World) -> Any:
    """Rank 0's ``value``, on every rank (a picklable object); unchanged for one process."""
    if not world.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gathered(value: Any, world: World) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank (a picklable object)."""
    if not world.distributed:
        return [value]
    values: list[Any] = [None] * world.size
    dist.all_gather_object(values, value)
    return values


def shard_size(n: int, world: World) -> int:
    """How many of ``n`` samples each rank takes: the same number on every rank (DDP hangs otherwise)."""
    return n // world.size


def shard(order: torch.Tensor, world: World) -> torch.Tensor:
    """This rank's share of an epoch's permutation: every ``size``-th index from ``rank``, cut to
    ``shard_size`` so that all ranks take the same number of steps."""
    if not world.distributed:
        return order
    return order[world.rank : shard_size(len(order), world) * world.size : world.size]


PROCESS_LIMIT_REASON = {
    "cuda": "one process per GPU",
    "cpu": "one process per CPU core; more only contend for the same cores",
    "mps": "DistributedDataParallel runs on CUDA or CPU",
}


def usable_cores() -> int:
    """The CPU cores this process may use: a taskset's or cpuset's share, not the host's count, and no
    more than a CPU quota allows (docker's ``--cpus``, a Kubernetes CPU limit)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cpu_quota()
    return min(cores, quota) if quota is not None else cores


def cpu_quota(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Whole cores the process's cgroup quotas allow (at least 1), cgroup v2 or v1; None without a quota.

    Every level from the process's cgroup up to the mount's root counts (a parent's quota binds its
    children); inside a container the host's path may not exist, and the container's own cgroup is
    then the mount's root."""
    try:
        # Decoded with replacement: one odd byte spoils no line but its own.
        lines = proc_cgroup.read_bytes().decode(errors="replace").splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers and "cpu" not in controllers.split(","):
            continue
        base = root / controllers if controllers else root
        folder = Path(os.path.normpath(base / path.strip().lstrip("/")))  # `/../..` (a cgroup namespace) stays below
        levels = [folder, *folder.parents]
        levels = levels[: levels.index(base) + 1] if base in levels else [base]  # ... or falls back to the mount root
        quotas += [q for q in (_level_quota(level, v2=not controllers) for level in levels) if q is not None]
    return max(1, int(min(quotas))) if quotas else None


def _level_quota(folder: Path, v2: bool) -> float | None:
    """Cores one cgroup's quota allows: v2 ``cpu.max`` "QUOTA PERIOD" (QUOTA ``max``: none), v1
    ``cpu.cfs_quota_us`` (-1: none) over ``cpu.cfs_period_us``; None where there is none or it is unreadable."""
    try:
        if v2:
            quota, period = (folder / "cpu.max").read_text().split()
        else:
            quota = (folder / "cpu.cfs_quota_us").read_text().strip()
            period = (folder / "cpu.cfs_period_us").read_text().strip()
        if quota in ("max", "-1") or int(period) <= 0 or int(quota) <= 0:
            return None
        return int(quota) / int(period)
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def process_limit(device: torch.device) -> int:
    """The most training processes this machine can give ``device``'s kind of work."""
    if device.type == "cuda":
        return torch.cuda.device_count()
    if device.type == "cpu":
        return usable_cores()
    return 1


class WorkerStopped(RuntimeError):
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


def _raise_stop(signum, frame):  # noqa: ARG001
    raise stop_signal_error(signum)


@contextlib.contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """Inside the block the ``stop_signals`` raise ``stop_signal_error`` (KeyboardInterrupt, or WorkerStopped
    under torchrun), so temporary files are removed and an MLflow run ends KILLED (FAILED)."""
    previous = {sig: signal.signal(sig, _raise_stop) for sig in stop_signals()}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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
