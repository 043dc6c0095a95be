"""DistributedDataParallel through torchrun: 2 CPU processes (Gloo) on the tiny data."""

from __future__ import annotations

import dataclasses
import json
import signal
import time

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import SEED_WIDTHS, processes_in, stage, the_runs, wait_for_line, write_tiny_params
from mnist_cnn.core.files import CHECKPOINT, WEIGHTS
from mnist_cnn.core.model import load_weights
from mnist_cnn.core.params import load_params

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")


def test_two_processes_make_one_finished_run_and_a_model_as_good(project, champion_store):
    """As good as the same training in one process: the champion (tests/conftest.py), the same tiny
    params with the seed's network, trained and evaluated with ``train.processes: 1``."""
    write_tiny_params(project.params_file, **{**SEED_WIDTHS, "train.processes": 2})
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

    assert load_params(champion_store.paths.params_file) == dataclasses.replace(
        params, train=dataclasses.replace(params.train, processes=1)
    )
    one = json.loads((champion_store.paths.reports / "metrics.json").read_text())["test"]["accuracy"]
    assert abs(two - one) < 6.0, (two, one)


@pytest.mark.parametrize("rank, status", [("1", "FAILED"), ("0", "KILLED")])
def test_a_rank_that_dies_ends_the_others_and_the_run(project, rank, status):
    """Rank 1 killed: torchrun stops rank 0, whose run ends FAILED. Rank 0 (the one that logs) killed:
    nobody could end its run, so the stage closes it KILLED once torchrun has exited."""
    write_tiny_params(project.params_file, **{"train.processes": 2, "train.epochs": 500, "train.patience": 500})
    proc = stage(project, "train")
    wait_for_line(proc, "epoch   1/")
    (victim,) = [p for p in processes_in(project.root) if p.environ().get("RANK") == rank]
    victim.send_signal(signal.SIGKILL)
    started = time.time()
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, output
    assert time.time() - started < 60
    assert output.rstrip().splitlines()[-1] == (
        f"error: training with train.processes = 2 failed (torchrun exit 1: rank {rank} exited with -9 (SIGKILL))"
    )
    for noise in ("Traceback", "ChildFailedError", "Root Cause", "closing signal"):  # torchrun's 40 lines
        assert noise not in output, output
    (run,) = the_runs()
    assert run.info.status == status
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
