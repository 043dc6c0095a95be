"""Predict the digit in image files (PNG, JPEG, any size and colours) with a registered model."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mnist_cnn.core.images import ImageError, image_files, load_digit
from mnist_cnn.tracking import records
from mnist_cnn.tracking.pyfunc import ModelError, load_model

DEFAULT_MODEL_URI = "models:/mnist-cnn@champion"


@dataclass(frozen=True)
class Prediction:
    path: Path
    digit: int | None = None
    probability: float | None = None
    probabilities: tuple[float, ...] = ()
    error: str | None = None  # one line naming the file and the problem; the other fields are then empty

    def row(self) -> dict:
        """The file and its digit, probability and p0..p9; or the file and its error."""
        if self.error is not None:
            return {"file": str(self.path), "error": self.error}
        probabilities = {f"p{k}": round(p, 6) for k, p in enumerate(self.probabilities)}
        return {"file": str(self.path), "digit": self.digit, "probability": round(self.probability, 6), **probabilities}


def _is_digit_table(answer: object, rows: int) -> bool:
    """Whether ``answer`` is what the registered mnist-cnn pyfunc returns for ``rows`` images."""
    numbers = ["probability", *(f"p{k}" for k in range(10))]
    if not (isinstance(answer, pd.DataFrame) and {"digit", *numbers} <= set(answer.columns) and len(answer) == rows):
        return False
    types = pd.api.types
    kinds = all(
        types.is_numeric_dtype(answer[n])
        and not types.is_complex_dtype(answer[n])
        and not types.is_bool_dtype(answer[n])
        for n in numbers
    )
    if not (types.is_integer_dtype(answer["digit"]) and kinds) or answer[["digit", *numbers]].isna().any().any():
        return False
    return bool(answer["digit"].between(0, 9).all() and np.isfinite(answer[numbers].to_numpy(dtype=float)).all())


def predict_and_record(paths: list[Path], model_uri: str = DEFAULT_MODEL_URI) -> list[Prediction]:
    """``predict``; under ``mlflow run . -e predict``, which made a run for this call, the run records it."""
    results = predict(paths, model_uri)
    if os.environ.get("MLFLOW_RUN_ID"):
        records.prediction_run(os.environ["MLFLOW_RUN_ID"], model_uri, [r.row() for r in results])
    return results


def predict(paths: list[Path], model_uri: str = DEFAULT_MODEL_URI) -> list[Prediction]:
    """One ``Prediction`` per image file (a directory: each image file in it), in order. A file that
    cannot be read or holds no digit gets its ``error``; the others are still predicted."""
    loaded: dict[Path, np.ndarray] = {}
    failed: dict[Path, str] = {}
    files = image_files(paths)
    for path in files:
        try:
            loaded[path] = load_digit(path)
        except ImageError as exc:
            failed[path] = str(exc)
    rows = {}
    if loaded:
        answer = load_model(model_uri).predict(np.stack(list(loaded.values())))
        if not _is_digit_table(answer, len(loaded)):
            raise ModelError(
                f"--model-uri {model_uri}: not an mnist-cnn model (its answer has no integer digit and numeric"
                " probability and p0..p9 columns, one row per image)"
            )
        rows = dict(zip(loaded, answer.itertuples(index=False), strict=True))
    results = []
    for path in files:
        if path in failed:
            results.append(Prediction(path, error=failed[path]))
            continue
        row = rows[path]
        probabilities = tuple(float(getattr(row, f"p{k}")) for k in range(10))
        results.append(Prediction(path, int(row.digit), float(row.probability), probabilities))
    return results


def print_predictions(results: list, as_json: bool) -> int:
    """A table (or one JSON list) of the digits; each file that failed as one ``error:`` line. Exit 1 if any failed."""
    import json

    good = [r for r in results if r.error is None]
    for result in results:
        if result.error is not None:
            print(f"error: {_printable(result.error)}", file=sys.stderr)
    if as_json:
        # One entry per file, in order; a file that failed has its error and no digit.
        print("[" + ",\n ".join(json.dumps(r.row()) for r in results) + "]")
    elif good:
        names = [_printable(str(r.path)) for r in good]
        width = max(map(len, names))
        print(f"{'file':<{width}}  digit  probability")
        for name, r in zip(names, good, strict=True):
            print(f"{name:<{width}}  {r.digit:>5}  {r.probability:>11.4f}")
    return 1 if len(good) < len(results) else 0


def _printable(text: str) -> str:
    """``text`` with control characters (a newline or an escape sequence in a file name) and undecodable
    bytes written as escapes, so that a name can neither break the table nor drive the terminal."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode() for c in text)
