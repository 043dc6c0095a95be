"""Where each stage reads and writes, relative to the project root (dvc.yaml names the same paths)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mnist_cnn.core.errors import ProjectError

PARAMS = Path("params.yaml")


DATA_DIR = Path("data/raw")


MODEL_DIR = Path("models")


WEIGHTS = MODEL_DIR / "model.pt"


TRAIN_INFO = MODEL_DIR / "train.json"  # best/stopped epoch, device, precision and the MLflow run id


# Written after every epoch, removed when training completes; not a DVC output (dvc repro keeps it).
CHECKPOINT = MODEL_DIR / "checkpoint.pt"


REPORTS_DIR = Path("reports")


HISTORY = REPORTS_DIR / "history.csv"


METRICS = REPORTS_DIR / "metrics.json"


PREDICTIONS = REPORTS_DIR / "predictions.csv"


CLASSIFICATION_REPORT = REPORTS_DIR / "classification_report.txt"


BEST_PARAMS = REPORTS_DIR / "best_params.yaml"  # the tune stage's best trial, in params.yaml's shape


CONFIDENT_MISTAKES = REPORTS_DIR / "confident_mistakes.png"


PIPELINE = Path("dvc.yaml")


class NoProjectError(ProjectError, FileNotFoundError):
    """No mnist-cnn project in or above a directory."""


def find_project(start: Path) -> Path:
    """The project ``start`` is in: the nearest directory at or above it holding params.yaml and dvc.yaml;
    from anywhere else, the checkout this package runs from (an editable install's clone)."""
    start = start.resolve()
    checkout = Path(__file__).resolve().parents[3]  # src/mnist_cnn/core/files.py -> the clone
    for folder in (start, *start.parents, checkout):
        if (folder / PARAMS).is_file() and (folder / PIPELINE).is_file():
            return folder
    raise NoProjectError(
        f"{start}: not in an mnist-cnn project (no {PARAMS} with a {PIPELINE} here or above); cd into your clone"
    )


def is_url(location: str) -> bool:
    """Whether a configured location (a mirror, a study's storage) is a URL rather than a path."""
    return "://" in location


class OutputError(ProjectError, OSError):
    """An output file could not be written (read-only directory, full disk, ...)."""


def current_umask() -> int:
    # The only portable way to read the umask is to set it; set it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish(tmp: Path, path: Path) -> None:
    """Give ``tmp`` the mode a plain ``open()`` would have (mkstemp makes 0600) and move it to ``path``."""
    os.chmod(tmp, 0o666 & ~current_umask())
    os.replace(tmp, path)


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path`` and move it into place only on success.

    Any OSError (read-only directory, full disk) becomes an ``OutputError`` naming ``path``, and
    leaves neither the temporary file nor a half-written ``path`` behind.
    """
    write_all_atomic({Path(path): write})


def write_all_atomic(writers: dict[Path, Callable[[Path], None]]) -> None:
    """``write_atomic`` for files that belong together: every one is written to its temporary file
    first, and only when all succeeded are they moved into place, so a full disk leaves none."""
    temps: dict[Path, Path] = {}
    path = None
    try:
        for path, write in writers.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            temps[path] = Path(tmp_name)
            write(temps[path])
        for path, tmp in temps.items():
            publish(tmp, path)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


@dataclass(frozen=True)
class Paths:
    """Where the stages read and write; defaults are the project layout, tests point them at tmp dirs."""

    root: Path = Path(".")
    params_file: Path = PARAMS

    @property
    def data(self) -> Path:
        return self.root / DATA_DIR

    @property
    def models(self) -> Path:
        return self.root / MODEL_DIR

    @property
    def reports(self) -> Path:
        return self.root / REPORTS_DIR
