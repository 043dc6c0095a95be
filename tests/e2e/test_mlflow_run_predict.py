"""``mlflow run . -e predict`` on an image file, against a copy of the champion's store."""

from __future__ import annotations

import os
import subprocess
import sys

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
    assert int(row[1]) == predict([image])[0].digit
