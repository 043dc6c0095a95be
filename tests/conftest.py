"""Shared fixtures: a tiny MNIST-format mirror made from scikit-learn's digits, tiny params, a private
MLflow store per test. Nothing here touches the network or ../shared."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from mnist_cnn.core.files import Paths
from mnist_cnn.core.params import Params, parse_params
from mnist_cnn.stages import evaluate, train
from mnist_cnn.tracking import store
from tinydata import write_checksums, write_tiny_mnist

REPO = Path(__file__).resolve().parents[1]

# Small enough for seconds per test on 2 cores; everything else is params.yaml's.
TINY_OVERRIDES = {
    "train.epochs": 2,
    "train.device": "cpu",
    "train.precision": "fp32",
    "evaluate.batch_size": 500,
}


@pytest.fixture(scope="session")
def tiny_mirror(tmp_path_factory) -> Path:
    """A directory holding the four tiny IDX .gz files, and beside it their checksums (``md5s.json``)."""
    root = tmp_path_factory.mktemp("tiny")
    mirror = root / "mirror"
    write_checksums(write_tiny_mnist(mirror), root / "md5s.json")
    return mirror


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch, tiny_mirror):
    """Each test: its own MLflow store, the tiny data's checksums, no mirror or run inherited from outside."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    # mlflow.set_registry_uri (store.configure) exports MLFLOW_REGISTRY_URI: never let one test's leak
    # into the next one's subprocesses.
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MNIST_MD5S", str(tiny_mirror.parent / "md5s.json"))
    monkeypatch.delenv("MNIST_MIRROR", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    # The stages' commands (`python -m mnist_cnn`) run with this interpreter.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    yield
    while mlflow.active_run() is not None:
        mlflow.end_run()


def repo_params_raw() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


@pytest.fixture
def tiny_params() -> Params:
    return parse_params(repo_params_raw(), TINY_OVERRIDES)


def write_tiny_params(path: Path, **overrides) -> Path:
    raw = repo_params_raw()
    for key, value in {**TINY_OVERRIDES, **overrides}.items():
        section, name = key.split(".")
        raw[section][name] = value
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture
def project(tmp_path, tiny_mirror) -> Paths:
    """A project directory with tiny params and the tiny data already downloaded into data/raw."""
    root = tmp_path / "project"
    root.mkdir()
    params_file = write_tiny_params(root / "params.yaml")
    shutil.copytree(tiny_mirror, root / "data" / "raw")
    return Paths(root=root, params_file=params_file)


def copy_project_files(dest: Path) -> None:
    """The files a user's clone has (code, pipeline, MLproject), without data, store or venv."""
    for name in ("dvc.yaml", "MLproject", "conda.yaml", "params.yaml", "pyproject.toml"):
        shutil.copy2(REPO / name, dest / name)
    shutil.copytree(REPO / "src", dest / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))


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


def run_queue(repo: Path, workers: int = 2, timeout: float = 900) -> str:
    """``dvc queue start -j WORKERS``, wait until nothing is queued or running; ``dvc queue status``."""
    dvc("queue", "start", "-j", str(workers), cwd=repo)
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = dvc("queue", "status", cwd=repo)
        if "Queued" not in status and "Running" not in status:
            return status
        time.sleep(3)
    dvc("queue", "stop", "--kill", cwd=repo)
    return status


def stage(project, *args: str, env: dict | None = None) -> subprocess.Popen:
    """``python -m mnist_cnn ARGS`` in the project directory, output merged and line-buffered."""
    return subprocess.Popen(
        [sys.executable, "-u", "-m", "mnist_cnn", *args, "--no-progress"],
        cwd=project.root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )


def wait_for_line(proc: subprocess.Popen, needle: str, timeout: float = 120) -> list[str]:
    lines, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    proc.kill()
    raise AssertionError(f"{needle!r} never printed:\n{''.join(lines)}")


def the_runs(experiment="mnist-cnn"):
    store.configure()
    exp = mlflow.get_experiment_by_name(experiment)
    return MlflowClient().search_runs([exp.experiment_id], order_by=["start_time ASC"]) if exp else []


@pytest.fixture(scope="session")
def champion_store(tmp_path_factory, tiny_mirror):
    """One tiny training evaluated into a store of its own, shared by the tests that only read its
    champion (serving, predict): its tracking URI, project directory and a local copy of the champion."""
    from types import SimpleNamespace


    root = tmp_path_factory.mktemp("champion")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    project = root / "project"
    project.mkdir()
    params_file = write_tiny_params(project / "params.yaml")
    shutil.copytree(tiny_mirror, project / "data" / "raw")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MLFLOW_REGISTRY_URI", uri)
        mp.setenv("MNIST_MD5S", str(tiny_mirror.parent / "md5s.json"))
        params = parse_params(repo_params_raw(), TINY_OVERRIDES)
        paths = Paths(root=project, params_file=params_file)
        train.run_train(params, paths, show_progress=False)
        evaluate.run_evaluate(params, paths)
        store.configure()
        local = mlflow.artifacts.download_artifacts("models:/mnist-cnn@champion", dst_path=str(root / "champion"))
    return SimpleNamespace(uri=uri, project=project, local=Path(local))
