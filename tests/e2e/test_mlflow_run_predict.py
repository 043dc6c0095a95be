"""``mlflow run . -e predict`` on an image file, against a copy of the champion's store: the answer, and
the run MLflow made for it records the call."""

from __future__ import annotations

import os
import subprocess
import sys

import mlflow
from mlflow.tracking import MlflowClient

from conftest import copy_project_files
from mnist_cnn.stages.predict import predict


def test_mlproject_predict_entry_point(digits, trained_project, tmp_path):
    root, _ = digits
    code = tmp_path / "clone"  # the copy of the champion's project and store is in tmp_path
    code.mkdir()
    copy_project_files(code)
    image = root / "big-inverted-rgb" / "000.png"
    result = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", ".", "-e", "predict", "--env-manager", "local"]
        + ["--experiment-name", "predictions", "-P", f"path={image}"],
        cwd=code,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ},  # MLFLOW_TRACKING_URI: the copy's store
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (row,) = [line.split() for line in result.stdout.splitlines() if line.startswith(str(image))]
    digit = predict([image])[0].digit
    assert int(row[1]) == digit

    # The run MLflow made for the call records it: never an empty run with a random name.
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("predictions").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "predict"
    assert run.data.tags["mnist_cnn.stage"] == "predict" and run.data.tags["launched_by"] == "mlflow run"
    assert run.data.tags["mnist_cnn.model_uri"] == "models:/mnist-cnn@champion"  # -P model_uri left at ""
    assert run.data.metrics == {"predicted_files": 1.0, "refused_files": 0.0}
    (answer,) = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/predictions.json")
    assert answer["file"] == str(image) and answer["digit"] == digit
