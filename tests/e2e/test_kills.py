"""Stages in child processes stopped for real: SIGTERM, SIGHUP (and nohup), repeated Ctrl-C while a run
ends, kill -9 and the stale runs and checkpoints it leaves, four trainings at once on a new store, a
second training in the same directory."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import mlflow
import torch
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from conftest import (
    EPOCH_LINE,
    assert_one_chain_of_champions,
    only_run,
    output_within,
    stage,
    the_runs,
    wait_for_line,
    write_tiny_params,
)
from mnist_cnn.cli import main
from mnist_cnn.stages import train
from mnist_cnn.stages.tune import OWNER_ATTR
from mnist_cnn.tracking import owners, store
from tune_helpers import journal, tune_runs, write_tune_params


def start_long_training(project, sighup) -> subprocess.Popen:
    """``train`` in a child, once its MLflow run exists; ``sighup``: the disposition it starts with (a
    terminal's default, or nohup's ignore; the test runner's own may be either)."""
    write_tiny_params(project.params_file, **{"train.epochs": 500, "train.patience": 500})
    proc = subprocess.Popen(
        [sys.executable, "-m", "mnist_cnn", "train", "--no-progress"],
        cwd=project.root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, sighup),
    )
    store.configure()
    deadline = time.time() + 120
    while time.time() < deadline:
        experiment = mlflow.get_experiment_by_name("mnist-cnn")
        if experiment and MlflowClient().search_runs([experiment.experiment_id]):
            break
        time.sleep(0.5)
    time.sleep(2)
    return proc


def test_sighup_during_training_ends_the_run_killed(project):
    proc = start_long_training(project, signal.SIG_DFL)
    proc.send_signal(signal.SIGHUP)  # the terminal closed; its default action would leave the run RUNNING
    output = output_within(proc, 60)
    assert proc.returncode == 130, output
    assert only_run().info.status == "KILLED"
    assert not (project.models / "model.pt").exists()


def test_under_nohup_sighup_stays_ignored_and_sigterm_ends_the_run_killed(project):
    proc = start_long_training(project, signal.SIG_IGN)
    proc.send_signal(signal.SIGHUP)
    time.sleep(2)
    assert proc.poll() is None and only_run().info.status == "RUNNING"  # still training
    proc.send_signal(signal.SIGTERM)  # as kill or a scheduler sends it
    output = output_within(proc, 60)
    assert proc.returncode == 130, output
    assert only_run().info.status == "KILLED"
    assert not (project.models / "model.pt").exists()


# 1. Parallel runs on a new store
def test_four_trainings_at_once_on_a_new_store_all_finish(tmp_path, tiny_mirror):
    store = tmp_path / "fresh" / "mlflow.db"
    assert not store.exists()
    procs = []
    for seed in range(4):
        root = tmp_path / f"p{seed}"
        shutil.copytree(tiny_mirror, root / "data" / "raw")
        write_tiny_params(root / "params.yaml", **{"train.epochs": 1, "train.seed": seed})
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "mnist_cnn", "all", "--no-progress"],
                cwd=root,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}"},
            )
        )
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    for proc, output in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, output
    mlflow.set_tracking_uri(f"sqlite:///{store}")
    mlflow.set_registry_uri(f"sqlite:///{store}")
    client = MlflowClient()
    found = client.search_runs([mlflow.get_experiment_by_name("mnist-cnn").experiment_id])
    assert len(found) == 4 and {run.info.status for run in found} == {"FINISHED"}
    assert all(len(client.get_metric_history(run.info.run_id, "val_loss")) == 1 for run in found)
    versions = client.search_model_versions("name = 'mnist-cnn'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3, 4]
    champion = client.get_model_version_by_alias("mnist-cnn", "champion")
    assert_one_chain_of_champions({str(v.version): v.tags for v in versions}, str(champion.version))


# 2. Signals during clean-up; SIGKILL; stale runs
def test_repeated_interrupts_while_ending_still_end_the_run_killed(project):
    write_tiny_params(project.params_file, **{"train.epochs": 500, "train.patience": 500})
    proc = stage(project, "train")
    wait_for_line(proc, EPOCH_LINE.format(epoch=1))
    proc.send_signal(signal.SIGINT)
    for _ in range(40):  # keep interrupting through the whole clean-up
        time.sleep(0.05)
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGINT if _ % 2 else signal.SIGTERM)
    output = output_within(proc, 60)
    assert proc.returncode != 0
    assert [run.info.status for run in the_runs()] == ["KILLED"], output


def test_sigkill_leaves_a_stale_run_that_runs_clean_closes_and_a_checkpoint_of_other_params(
    project, tiny_params, capsys, caplog
):
    """kill -9 mid-training: the run stays RUNNING until ``runs --clean`` closes it (a run of another
    host is never touched), and the checkpoint it left, of other params, is not resumed."""
    write_tiny_params(project.params_file, **{"train.epochs": 500, "train.patience": 500})
    proc = stage(project, "train")
    wait_for_line(proc, EPOCH_LINE.format(epoch=1))
    proc.kill()
    proc.wait(timeout=30)
    killed = the_runs()[0]
    assert killed.info.status == "RUNNING"
    # A run another host is running on the same (shared) store: never touched.
    client = MlflowClient()
    other = client.create_run(killed.info.experiment_id, tags={owners.HOST_TAG: "elsewhere", owners.PID_TAG: "1"})

    states = {r.run_id: r.state for r in owners.running("mnist-cnn")}
    assert states == {killed.info.run_id: "stale", other.info.run_id: "unknown"}
    assert main(["runs", "--clean", "--params", str(project.params_file), "--root", str(project.root)]) == 0
    out = capsys.readouterr().out
    assert "closed 1 stale run(s) as KILLED" in out and killed.info.run_id in out
    assert client.get_run(killed.info.run_id).info.status == "KILLED"
    assert client.get_run(other.info.run_id).info.status == "RUNNING"

    assert (project.models / "checkpoint.pt").exists()
    caplog.set_level("INFO")
    run_id, result = train.run_train(tiny_params, project, show_progress=False)  # other epochs/patience
    assert (
        f"from a training with train.epochs = 500 (now {tiny_params.train.epochs}), train.patience = 500" in caplog.text
    )
    assert [h.epoch for h in result.history] == [1, 2]
    assert run_id not in (killed.info.run_id, other.info.run_id)  # the killed run was not reused
    assert client.get_run(run_id).info.status == "FINISHED"


def test_a_tune_worker_killed_mid_trial_leaves_no_trial_running_and_the_next_worker_completes_the_study(project):
    """kill -9 in a trial leaves it RUNNING in the study: the next worker ends it FAIL (its worker is
    provably gone) and runs the trial it did not finish: the study gets its n_trials finished."""
    write_tune_params(project.params_file, n_trials=1, epochs=2, pruner="none")
    killed = stage(project, "tune")
    wait_for_line(killed, EPOCH_LINE.format(epoch=1))
    killed.kill()
    killed.wait(timeout=30)
    (left,) = journal(project.root).get_trials()
    assert left.state == TrialState.RUNNING and left.user_attrs[OWNER_ATTR][owners.PID_TAG] == str(killed.pid)

    worker = stage(project, "tune")
    output, _ = worker.communicate(timeout=300)
    assert worker.returncode == 0, output
    assert f"trial 0 was left RUNNING (its worker, process {killed.pid}, is gone): ended FAIL" in output
    assert "this worker ran trial(s) [1]" in output
    trials = journal(project.root).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    parents, children = tune_runs(project.root)
    assert [p.info.status for p in parents] == ["FINISHED"]
    (child_0,) = [c for c in children if c.data.tags["optuna.trial_number"] == "0"]
    assert child_0.info.status == "KILLED"  # closed as stale by the next worker's first trial
    assert (project.root / "reports" / "best_params.yaml").is_file()


# Resume after SIGKILL
def tensors_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigkill_after_epoch_2_of_4_resumes_in_the_same_run_to_identical_weights(tmp_path, project, tiny_mirror):
    # Augmentation, the weight average, BatchNorm and the best accuracy carry state: resume must restore it.
    settings = {
        "train.epochs": 4,
        "train.patience": 10,
        "train.batch_size": 16,
        "train.augment_shift": 2,
        "train.augment_rotate": 10,
        "train.augment_elastic": 34,
        "train.augment_erase": 0.5,
        "train.ema_decay": 0.9,
        "train.monitor": "val_acc",
        "model.batchnorm": True,
    }
    write_tiny_params(project.params_file, **settings)
    proc = stage(project, "train")
    wait_for_line(proc, EPOCH_LINE.format(epoch=2))
    proc.kill()
    proc.wait(timeout=30)
    checkpoint = torch.load(project.models / "checkpoint.pt", weights_only=True)
    assert 2 <= checkpoint["epoch"] < 4 and not (project.models / "model.pt").exists()
    interrupted = the_runs()[0]
    assert interrupted.info.status == "RUNNING"

    resumed = stage(project, "train")
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    assert f"resuming after epoch {checkpoint['epoch']}" in output
    assert not (project.models / "checkpoint.pt").exists()
    (run,) = the_runs()
    assert run.info.run_id == interrupted.info.run_id and run.info.status == "FINISHED"
    assert [m.step for m in MlflowClient().get_metric_history(run.info.run_id, "val_loss")] == [1, 2, 3, 4]

    # The same training, never interrupted, in another project directory and store.
    clean = tmp_path / "clean"
    shutil.copytree(tiny_mirror, clean / "data" / "raw")
    write_tiny_params(clean / "params.yaml", **settings)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'clean.db'}"}
    uninterrupted = subprocess.run(
        [sys.executable, "-m", "mnist_cnn", "train", "--no-progress"], cwd=clean, env=env, capture_output=True
    )
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    weights = [torch.load(root / "models" / "model.pt", weights_only=True) for root in (project.root, clean)]
    assert tensors_equal(*weights)
    histories = [(root / "reports" / "history.csv").read_text().splitlines() for root in (project.root, clean)]
    drop_seconds = [[",".join(line.split(",")[:-1]) for line in history] for history in histories]
    assert drop_seconds[0] == drop_seconds[1]
    infos = [json.loads((root / "models" / "train.json").read_text()) for root in (project.root, clean)]
    assert [(i["best_epoch"], i["best_val_loss"]) for i in infos] == [
        (infos[1]["best_epoch"], infos[1]["best_val_loss"])
    ] * 2


def test_second_training_in_the_same_directory_waits_for_the_first(project):
    write_tiny_params(project.params_file, **{"train.epochs": 500, "train.patience": 500})
    first = stage(project, "train")
    second = None
    try:
        wait_for_line(first, EPOCH_LINE.format(epoch=1))
        second = stage(project, "train", "--epochs", "2")
        wait_for_line(second, "waiting for it to finish", timeout=60)
        assert first.poll() is None and second.poll() is None
    finally:
        for proc in (first, second):
            if proc is not None:
                proc.kill()
                proc.wait(timeout=30)


def test_killed_training_whose_run_was_deleted_starts_a_new_run(project, tiny_params):
    write_tiny_params(project.params_file, **{"train.epochs": 2})
    proc = stage(project, "train")
    wait_for_line(proc, EPOCH_LINE.format(epoch=1))
    proc.kill()
    proc.wait(timeout=30)
    (killed,) = the_runs()
    MlflowClient().delete_run(killed.info.run_id)
    run_id, result = train.run_train(tiny_params, project, show_progress=False)
    assert run_id != killed.info.run_id
    assert MlflowClient().get_run(run_id).info.status == "FINISHED"
    assert [m.step for m in MlflowClient().get_metric_history(run_id, "val_loss")] == [1, 2]
