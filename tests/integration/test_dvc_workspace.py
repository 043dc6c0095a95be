"""A stage run in a DVC repo (a copy of the initialised template): no mirror, and where the store is."""

from __future__ import annotations

import os
import subprocess
import sys

from mnist_cnn.tracking import store


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
    assert store.tracking_uri() == f"sqlite:///{dvc_repo.resolve()}/mlflow.db"
