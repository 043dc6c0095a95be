"""`mlflow run . --env-manager local`: one run (the one MLflow made), params from -P, a new model version."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from conftest import copy_project_files, write_tiny_params
from mnist_cnn.core.data import load_split
from mnist_cnn.tracking.store import configure


def test_mlflow_run_whose_environment_fails_is_closed_by_runs_clean(tmp_path, tiny_mirror, monkeypatch, mlflow_store):
    if shutil.which("conda"):
        pytest.skip("conda is installed here: `mlflow run .` would build its environment")
    project = tmp_path / "project"
    project.mkdir()
    copy_project_files(project)
    write_tiny_params(project / "params.yaml")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "mnist-cnn")
    # As most people type it: no --env-manager, so MLflow wants conda, which is not there.
    failed = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", ".", "-P", "epochs=1"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert failed.returncode != 0
    configure()
    experiment = mlflow.get_experiment_by_name("mnist-cnn")  # MLFLOW_EXPERIMENT_NAME picked the experiment
    (left,) = MlflowClient().search_runs([experiment.experiment_id])
    assert left.info.status == "RUNNING"  # MLflow's doing: it made the run, then failed before our code

    cleaned = subprocess.run(
        [sys.executable, "-m", "mnist_cnn", "runs", "--clean"], cwd=project, capture_output=True, text=True
    )
    assert cleaned.returncode == 0, cleaned.stderr
    assert "closed 1 stale run(s) as KILLED" in cleaned.stdout
    run = MlflowClient().get_run(left.info.run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags["mnist_cnn.closed"] == "stale: mlflow run never reached the project's code"


@pytest.mark.slow
@pytest.mark.parametrize("env_manager", ["virtualenv", "uv"])
def test_mlflow_run_builds_its_environment(env_manager, tmp_path, tiny_mirror, monkeypatch, mlflow_store):
    """Opt-in (-m slow): minutes, since it installs torch into a fresh environment from conda.yaml."""
    tool = {"virtualenv": "pyenv", "uv": "uv"}[env_manager]
    if shutil.which(tool) is None and not (Path(sys.executable).parent / tool).exists():
        pytest.skip(f"--env-manager {env_manager} needs {tool}")
    project = tmp_path / "project"
    project.mkdir()
    copy_project_files(project)
    write_tiny_params(project / "params.yaml")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "mnist-cnn")
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    result = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", ".", "--env-manager", env_manager, "-P", "epochs=1"]
        + ["-P", f"mirror={tiny_mirror}"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=3000,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    configure()
    (run,) = MlflowClient().search_runs([mlflow.get_experiment_by_name("mnist-cnn").experiment_id])
    assert run.info.status == "FINISHED" and "test_acc" in run.data.metrics
    assert run.data.tags["mlflow.project.env"] == env_manager


def mlflow_run(project: Path, *args: str) -> subprocess.Popen:
    """``mlflow run . --env-manager local ARGS`` in ``project``, output merged."""
    command = [sys.executable, "-m", "mlflow", "run", ".", "--env-manager", "local", *args]
    return subprocess.Popen(command, cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_four_mlflow_runs_at_once_on_one_store_the_main_entry_point_among_them(tmp_path, tiny_mirror, monkeypatch):
    """The main entry point (download from the mirror, train, evaluate, with -P overrides) in one clone
    and three ``-e train`` runs in another, all started at once on one store: each is the one run MLflow
    made, and all finish (the three take turns in their clone, whose directory lock they share)."""
    project, other = tmp_path / "project", tmp_path / "other"
    for clone in (project, other):
        clone.mkdir()
        copy_project_files(clone)
        write_tiny_params(clone / "params.yaml", **{"train.epochs": 3})
    shutil.copytree(tiny_mirror, other / "data" / "raw")  # -e train: the data is there already
    store = tmp_path / "new" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "mnist-cnn")
    # MLflow's own CLI creates a new store's tables unguarded (its processes race: "duplicate column
    # name: step"); the project creates it under its lock first, as scripts/setup.sh does.
    created = subprocess.run([sys.executable, "-m", "mnist_cnn", "runs"], cwd=project, capture_output=True, text=True)
    assert created.returncode == 0 and store.exists(), created.stderr
    main = mlflow_run(project, "-P", "epochs=1", "-P", "train.lr=0.2", "-P", f"mirror={tiny_mirror}")
    trains = [mlflow_run(other, "-e", "train", "-P", "epochs=1", "-P", f"train.seed={seed}") for seed in (2, 3, 4)]
    main_output = main.communicate(timeout=600)[0]
    assert main.returncode == 0, main_output
    outputs = [proc.communicate(timeout=600)[0] for proc in trains]
    assert [proc.returncode for proc in trains] == [0] * 3, "\n".join(outputs)

    configure()
    client = MlflowClient()
    runs = client.search_runs([mlflow.get_experiment_by_name("mnist-cnn").experiment_id])
    assert len(runs) == 4, "mlflow run must not start a second run"
    assert {run.info.status for run in runs} == {"FINISHED"}
    assert all(len(client.get_metric_history(run.info.run_id, "val_loss")) == 1 for run in runs)
    (run,) = [run for run in runs if run.data.tags.get("mlflow.project.entryPoint") == "main"]
    assert sorted(r.data.params["train.seed"] for r in runs if r is not run) == ["2", "3", "4"]

    # MLflow made the run with a random name; the stage renamed it (params.yaml's order).
    assert run.info.run_name == "all epochs=1 lr=0.2"
    assert run.data.tags["launched_by"] == "mlflow run" and run.data.tags["mlflow.source.type"] == "PROJECT"
    params = run.data.params
    assert params["epochs"] == "1" and params["train.epochs"] == "1"  # -P overrides params.yaml's 3
    assert params["train.lr"] == "0.2" and params["model.hidden_3"] == "16"  # the params file's (tiny widths)
    assert params["mlflow.registered_model"] == "mnist-cnn"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [1]
    assert "test_acc" in run.data.metrics

    version = client.get_model_version_by_alias("mnist-cnn", "champion")
    assert version.run_id == run.info.run_id  # the only one evaluated
    model = mlflow.pyfunc.load_model("models:/mnist-cnn@champion")
    pixels = load_split(project / "data" / "raw", train=False).images[:8].numpy().astype(np.float32)
    digits = model.predict(pixels)["digit"]
    assert digits.shape == (8,) and set(digits.tolist()) <= set(range(10))
