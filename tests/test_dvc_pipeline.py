"""The real DVC CLI on the tiny data, inside a temporary git repo: repro, no-op repro, `exp run -S`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from conftest import copy_project_files, write_tiny_params
from mnist_cnn import tracking


def sh(args, cwd, env=None):
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def dvc(*args, cwd, env=None):
    return sh([sys.executable, "-m", "dvc", *args], cwd, env)


def git(*args, cwd):
    return sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd)


@pytest.fixture
def dvc_repo(tmp_path, tiny_mirror, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    copy_project_files(repo)
    write_tiny_params(repo / "params.yaml")
    (repo / ".gitignore").write_text("mlflow.db\nmlartifacts/\n")
    git("init", "-q", cwd=repo)
    dvc("init", "-q", cwd=repo)
    git("add", "-A", cwd=repo)
    git("commit", "-qm", "init", cwd=repo)
    monkeypatch.setenv("MNIST_MIRROR", str(tiny_mirror))
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the default store: <repo>/mlflow.db
    return repo


def ran_stages(output: str) -> list[str]:
    return [stage for stage in ("download", "train", "evaluate") if f"Running stage '{stage}'" in output]


def runs_in(repo: Path):
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    mlflow.set_registry_uri(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = mlflow.get_experiment_by_name("mnist-cnn")
    return MlflowClient().search_runs([experiment.experiment_id], order_by=["start_time ASC"])


def test_repro_then_noop_then_param_change_reruns_only_train_and_evaluate(dvc_repo):
    first = dvc("repro", cwd=dvc_repo)
    assert ran_stages(first) == ["download", "train", "evaluate"]
    metrics = json.loads((dvc_repo / "reports" / "metrics.json").read_text())
    assert set(metrics) == {"train", "val", "test"} and metrics["test"]["accuracy"] > 50

    shown = json.loads(dvc("metrics", "show", "--json", cwd=dvc_repo))
    workspace = next(iter(shown.values()))["data"]["reports/metrics.json"]["data"]
    assert workspace == metrics
    plots = json.loads(dvc("plots", "show", "--json", "--split", cwd=dvc_repo))
    assert {"Loss", "Accuracy", "Confusion matrix"} <= set(plots["data"])

    runs = runs_in(dvc_repo)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert "test_acc" in runs[0].data.metrics
    train_info = json.loads((dvc_repo / "models" / "train.json").read_text())
    assert train_info["run_id"] == runs[0].info.run_id

    second = dvc("repro", cwd=dvc_repo)
    assert ran_stages(second) == []
    assert len(runs_in(dvc_repo)) == 1

    git("add", "-A", cwd=dvc_repo)
    git("commit", "-qm", "first run", cwd=dvc_repo)
    experiment = dvc("exp", "run", "-S", "train.lr=0.2", cwd=dvc_repo)
    assert ran_stages(experiment) == ["train", "evaluate"]
    runs = runs_in(dvc_repo)
    assert len(runs) == 2
    assert runs[1].data.params["train.lr"] == "0.2"
    assert all(run.info.status == "FINISHED" for run in runs)
    versions = MlflowClient().search_model_versions("name='mnist-cnn'")
    assert len(versions) == 2


def test_download_without_network_or_mirror_fails_fast_with_one_clear_line(dvc_repo, monkeypatch):
    monkeypatch.setenv("MNIST_MIRROR", str(dvc_repo / "no-such-dir"))
    env = {**os.environ}
    result = subprocess.run(
        [sys.executable, "-m", "mnist_cnn", "download"],
        cwd=dvc_repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: mirror ")
    assert "no-such-dir" in result.stderr and "not a directory" in result.stderr
    assert not (dvc_repo / "data" / "raw" / "train-images-idx3-ubyte.gz").exists()


def test_store_path_is_absolute_in_the_repo(dvc_repo, monkeypatch):
    monkeypatch.chdir(dvc_repo)
    assert tracking.tracking_uri() == f"sqlite:///{dvc_repo.resolve()}/mlflow.db"
