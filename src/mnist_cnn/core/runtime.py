"""Device and precision selection, seeding, and the autocast context shared by train and evaluate."""

from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path

import numpy as np
import torch

from mnist_cnn.core.errors import ProjectError

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


class DeviceError(ProjectError, RuntimeError):
    """The device or precision asked for does not exist on this machine."""


def select_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; an explicit device that is absent is an error."""
    available = {
        "cuda": torch.cuda.is_available(),
        "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
        "cpu": True,
    }
    if name == "auto":
        name = next(dev for dev in ("cuda", "mps", "cpu") if available[dev])
    if not available[name]:
        raise DeviceError(f"train.device = {name!r}: no such device on this machine (try auto or cpu)")
    return torch.device(name)


def cpu_has_fast_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True on CPUs with native bf16 matrix units (AMX or AVX512-BF16); elsewhere bf16 is emulated."""
    try:
        flags = cpuinfo.read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def select_precision(name: str, device: torch.device) -> str:
    """``auto`` is bf16 on CPUs with bf16 matrix units (AMX/AVX512-BF16), else fp32.

    On CUDA this small network ran 1.22x faster in fp32 (cuDNN's TF32) than under bf16 autocast
    (H200, README: Speed): the casts cost more than the tensor cores save.
    """
    if name == "fp16" and device.type != "cuda":
        raise DeviceError(f"train.precision = 'fp16': supported on CUDA only, not on {device.type}")
    if name != "auto":
        return name
    if device.type == "cpu" and cpu_has_fast_bf16():
        return "bf16"
    return "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def memory_format(device: torch.device) -> torch.memory_format:
    """channels_last is faster for these convolutions on CPU (oneDNN: 1.4x in fp32 here) and CUDA (cuDNN)."""
    return torch.contiguous_format if device.type == "mps" else torch.channels_last


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
