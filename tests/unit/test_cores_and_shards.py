"""DistributedDataParallel's parts that need no second process: shards, cores under a CPU quota, what a
stop signal means under torchrun."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from mnist_cnn.core import distributed, runtime
from mnist_cnn.core.inference import predict_log_probs
from mnist_cnn.core.world import SINGLE, World
from mnist_cnn.ops import signals


def test_shards_are_disjoint_equal_and_cover_the_permutation():
    order = torch.randperm(101, generator=torch.Generator().manual_seed(0))
    shards = [distributed.shard(order, World(rank, 2)) for rank in range(2)]
    assert len(shards[0]) == len(shards[1]) == 50  # equal steps on every rank; one sample left for the next epoch
    assert distributed.shard_size(101, World(1, 2)) == 50  # what fit counts its steps by
    assert distributed.shard_size(101, SINGLE) == 101
    assert not set(shards[0].tolist()) & set(shards[1].tolist())
    assert torch.equal(distributed.shard(order, SINGLE), order)


def test_an_empty_share_of_the_validation_set_scores_as_nothing():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10), torch.nn.LogSoftmax(dim=1))
    assert predict_log_probs(net, torch.zeros((0, 1, 28, 28)), 100).shape == (0, 10)


def fake_cgroup(tmp_path, proc: str, files: dict[str, str]):
    (tmp_path / "self_cgroup").write_text(proc)
    for name, text in files.items():
        (tmp_path / "fs" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "fs" / name).write_text(text)
    return runtime.cpu_quota(tmp_path / "self_cgroup", tmp_path / "fs")


@pytest.mark.parametrize(
    ("proc", "files", "cores"),
    [
        ("0::/docker/abc\n", {"docker/abc/cpu.max": "150000 100000\n"}, 1),  # v2, docker run --cpus 1.5
        ("0::/\n", {"cpu.max": "400000 100000\n"}, 4),
        ("0::/\n", {"cpu.max": "max 100000\n"}, None),  # no quota
        ("0::/k8s\n", {"k8s/cpu.max": "50000 100000\n"}, 1),  # half a core still runs one process
        (  # v1 (and hybrid: a unified line without cpu.max comes first)
            "4:memory:/x\n1:cpu,cpuacct:/x\n0::/\n",
            {"cpu,cpuacct/x/cpu.cfs_quota_us": "200000\n", "cpu,cpuacct/x/cpu.cfs_period_us": "100000\n"},
            2,
        ),
        ("1:cpu:/\n", {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ("0::/\n", {}, None),  # no cgroup files at all (macOS, a bare chroot)
        ("0::/init\n", {"init/cpu.max": "max 100000\n", "cpu.max": "200000 100000\n"}, 2),  # a parent's quota binds
        (  # docker on v1: the host's path is not there, the container's cgroup is the mount's root
            "1:cpu,cpuacct:/docker/abc\n",
            {"cpu,cpuacct/cpu.cfs_quota_us": "300000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"},
            3,
        ),
        ("garbage\n\x00\x01\n0::/\n", {"cpu.max": "200000 100000\n"}, 2),  # unreadable lines skipped
        ("0::/\n", {"cpu.max": "200000 0\n"}, None),  # a zero period: no quota, not a ZeroDivisionError
        ("0::/../..\n", {"cpu.max": "300000 100000\n", "../cpu.max": "100000 100000\n"}, 3),  # never above the mount
        ("0::/\xff\n1:cpu:/\n", {"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2),
    ],
)
def test_a_cpu_quota_bounds_the_usable_cores(tmp_path, proc, files, cores):
    assert fake_cgroup(tmp_path, proc, files) == cores


def test_usable_cores_takes_the_smaller_of_affinity_and_quota(monkeypatch):
    affinity = len(os.sched_getaffinity(0))
    monkeypatch.setattr(runtime, "cpu_quota", lambda: 1)
    assert runtime.usable_cores() == 1
    monkeypatch.setattr(runtime, "cpu_quota", lambda: None)
    assert runtime.usable_cores() == affinity


def test_under_torchrun_sigterm_means_a_peer_failed_but_sighup_a_closed_terminal(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert isinstance(signals.stop_signal_error(signal.SIGTERM), signals.WorkerStopped)  # run FAILED
    assert isinstance(signals.stop_signal_error(signal.SIGHUP), KeyboardInterrupt)  # run KILLED
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert isinstance(signals.stop_signal_error(signal.SIGTERM), KeyboardInterrupt)
