"""Where each stage reads and writes, relative to the project root (dvc.yaml names the same paths)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

PARAMS = Path("params.yaml")
DATA_DIR = Path("data/raw")
MODEL_DIR = Path("models")
WEIGHTS = MODEL_DIR / "model.pt"
TRAIN_INFO = MODEL_DIR / "train.json"  # best/stopped epoch, device, precision and the MLflow run id
REPORTS_DIR = Path("reports")
HISTORY = REPORTS_DIR / "history.csv"
METRICS = REPORTS_DIR / "metrics.json"
PREDICTIONS = REPORTS_DIR / "predictions.csv"
CLASSIFICATION_REPORT = REPORTS_DIR / "classification_report.txt"


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path`` and move it into place only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))
