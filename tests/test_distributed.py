"""DistributedDataParallel through torchrun: 2 CPU processes (Gloo) on the tiny data."""

from __future__ import annotations

import json
import os
import signal
import time

import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import stage, the_runs, wait_for_line, write_tiny_params
from mnist_cnn.core import distributed, runtime
from mnist_cnn.core.files import CHECKPOINT, WEIGHTS
from mnist_cnn.core.inference import predict_log_probs
from mnist_cnn.core.model import load_weights
from mnist_cnn.core.params import load_params
from mnist_cnn.ops import signals

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")


def processes_in(root) -> list[psutil.Process]:
    """Processes working in ``root`` (the stage, torchrun and its workers)."""
    found = []
    for proc in psutil.process_iter(["cwd"]):
        if proc.info["cwd"] and proc.info["cwd"] == str(root):
            found.append(proc)
    return found


def test_shards_are_disjoint_equal_and_cover_the_permutation():
    order = torch.randperm(101, generator=torch.Generator().manual_seed(0))
    shards = [distributed.shard(order, distributed.World(rank, 2)) for rank in range(2)]
    assert len(shards[0]) == len(shards[1]) == 50  # equal steps on every rank; one sample left for the next epoch
    assert distributed.shard_size(101, distributed.World(1, 2)) == 50  # what fit counts its steps by
    assert distributed.shard_size(101, distributed.SINGLE) == 101
    assert not set(shards[0].tolist()) & set(shards[1].tolist())
    assert torch.equal(distributed.shard(order, distributed.SINGLE), order)


def test_two_processes_make_one_finished_run_and_a_model_as_good(project):
    write_tiny_params(project.params_file, **{"train.processes": 2})
    proc = stage(project, "all")
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    assert "rank 1 of 2 processes" in output and "rank 0 of 2 processes" in output
    (run,) = the_runs()
    assert run.info.status == "FINISHED" and run.data.params["world_size"] == "2"
    steps = [m.step for m in MlflowClient().get_metric_history(run.info.run_id, "val_loss")]
    assert steps == [1, 2]  # rank 0 alone logged
    two = json.loads((project.reports / "metrics.json").read_text())["test"]["accuracy"]
    params = load_params(project.params_file)
    load_weights(params.model, project.models / "model.pt")  # loads into the plain Net: no DDP prefixes
    assert not processes_in(project.root)

    write_tiny_params(project.params_file, **{"train.processes": 1})
    single = stage(project, "all")
    output, _ = single.communicate(timeout=300)
    assert single.returncode == 0, output
    one = json.loads((project.reports / "metrics.json").read_text())["test"]["accuracy"]
    assert abs(two - one) < 6.0, (two, one)


def test_a_rank_that_dies_ends_the_others_and_the_run_failed(project):
    write_tiny_params(project.params_file, **{"train.processes": 2, "train.epochs": 500, "train.patience": 500})
    proc = stage(project, "train")
    wait_for_line(proc, "epoch   1/")
    (rank_1,) = [p for p in processes_in(project.root) if p.environ().get("RANK") == "1"]
    rank_1.send_signal(signal.SIGKILL)
    started = time.time()
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, output
    assert time.time() - started < 60
    assert output.rstrip().splitlines()[-1] == "error: training with train.processes = 2 failed (torchrun exit 1)"
    (run,) = the_runs()
    assert run.info.status == "FAILED"
    assert not (project.models / WEIGHTS.name).exists()
    time.sleep(1)
    assert not processes_in(project.root)


def test_sigterm_to_the_launcher_stops_every_worker_and_a_rerun_resumes_to_the_same_bits(project):
    settings = {"train.processes": 2, "train.epochs": 6, "train.patience": 10, "train.batch_size": 16}
    write_tiny_params(project.params_file, **settings, **{"train.augment_shift": 2, "model.dropout1": 0.2})
    straight = stage(project, "train")
    output, _ = straight.communicate(timeout=300)
    assert straight.returncode == 0, output
    expected = torch.load(project.models / WEIGHTS.name, weights_only=True)
    (project.models / WEIGHTS.name).unlink()

    interrupted = stage(project, "train")
    wait_for_line(interrupted, "epoch   2/")
    interrupted.send_signal(signal.SIGTERM)  # the launcher alone, as kill or a scheduler sends it
    output, _ = interrupted.communicate(timeout=120)
    assert interrupted.returncode == 130, output
    assert not processes_in(project.root)  # torchrun and both ranks ended with the stage
    assert the_runs()[-1].info.status == "KILLED"
    assert not (project.models / WEIGHTS.name).exists()
    checkpoint = torch.load(project.models / CHECKPOINT.name, weights_only=True)
    assert 2 <= checkpoint["epoch"] < 6 and len(checkpoint["random_streams"]) == 2

    resumed = stage(project, "train")
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    assert output.count("resuming after epoch") == 2  # both ranks, from rank 0's copy of the checkpoint
    weights = torch.load(project.models / WEIGHTS.name, weights_only=True)
    # Each rank's own dropout and augmentation streams came back: the same bits as never stopped.
    assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in weights)


@pytest.mark.parametrize(
    ("settings", "code", "message"),
    [
        ({"train.processes": 1000}, 2, "train.processes = 1000: expected at most "),
        ({"train.processes": 2, "train.device": "mps"}, 1, "train.device = 'mps': no such device on this machine"),
    ],
)
def test_impossible_process_counts_and_devices_are_refused_before_torchrun_starts(project, settings, code, message):
    write_tiny_params(project.params_file, **settings)
    proc = stage(project, "train")
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == code, output
    assert output.strip().splitlines() == [output.strip().splitlines()[0]] and message in output
    assert "torch.distributed.run" not in output and not the_runs()


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
