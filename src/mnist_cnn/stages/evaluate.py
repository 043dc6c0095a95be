"""Evaluate stage: train, validation and test loss and accuracy; confusion matrix; classification report;
the grid of the most confidently wrong test digits."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mnist_cnn.core import figures, files
from mnist_cnn.core.augment import TTA_SHIFTS, shift
from mnist_cnn.core.data import (
    DataError,
    load_split,
    normalise,
    verified_md5s,
)
from mnist_cnn.core.data_checks import training_and_validation
from mnist_cnn.core.files import Paths
from mnist_cnn.core.inference import loss_and_accuracy, predict_log_probs, prepare_model
from mnist_cnn.core.model import NUM_CLASSES, Net, load_weights
from mnist_cnn.core.params import EvaluateConfig, Params
from mnist_cnn.core.runtime import select_device, select_precision
from mnist_cnn.tracking import records, runs, store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateResult:
    metrics: dict[str, dict[str, float]]  # {"train"|"val"|"test": {"loss": ..., "accuracy": ...}}
    confusion: np.ndarray  # (10, 10) counts, rows = actual, columns = predicted
    report: str  # scikit-learn's classification report on the test set
    actual: np.ndarray
    predicted: np.ndarray
    confidence: np.ndarray  # the probability each test prediction was given
    val_correct: np.ndarray  # which validation images it got right: the champion is chosen on them
    data_md5s: dict[str, str] = field(default_factory=dict)  # {data file: MD5}, as verified


def evaluate(
    params: Params,
    data_dir: Path = files.DATA_DIR,
    model_dir: Path = files.MODEL_DIR,
    reports_dir: Path = files.REPORTS_DIR,
) -> tuple[Net, EvaluateResult]:
    """Score the trained weights on the three splits and write the metrics, predictions and report."""
    md5s = verified_md5s(data_dir, params.data.dataset)
    device = select_device(params.train.device)
    precision = select_precision(params.train.precision, device)
    net = load_weights(params.model, Path(model_dir) / files.WEIGHTS.name, device)
    model = prepare_model(net, device)
    train_data, val_data = training_and_validation(params, data_dir, device)
    test = load_split(data_dir, train=False)
    splits = {
        "train": (train_data.x, train_data.y),
        "val": (val_data.x, val_data.y),
        "test": (normalise(test.images, params.data.dataset).to(device), test.labels.to(device)),
    }
    background = train_data.x.amin().item()  # the normalised value of a blank pixel
    metrics, answers = {}, {}
    for name, (x, y) in splits.items():
        answers[name] = score(model, x, params.evaluate, precision, background)
        loss, accuracy = loss_and_accuracy(answers[name], y)
        metrics[name] = {"loss": round(loss, 6), "accuracy": round(accuracy, 4)}
    test_log_probs = answers["test"]
    val_correct = (answers["val"].argmax(dim=1) == val_data.y).cpu().numpy()
    # Imported here: scikit-learn costs seconds to import, and the train stage loads this module too.
    from sklearn.metrics import classification_report, confusion_matrix

    actual = test.labels.numpy()
    best = test_log_probs.argmax(dim=1)
    predicted = best.cpu().numpy()
    confidence = test_log_probs.gather(1, best.unsqueeze(1)).squeeze(1).exp().cpu().numpy()
    labels = list(range(NUM_CLASSES))
    result = EvaluateResult(
        metrics=metrics,
        confusion=confusion_matrix(actual, predicted, labels=labels),
        report=classification_report(actual, predicted, labels=labels, digits=4, zero_division=0),
        actual=actual,
        predicted=predicted,
        confidence=confidence,
        val_correct=val_correct,
        data_md5s=md5s,
    )
    write_reports(result, Path(reports_dir), test.images.numpy())
    return net.cpu().eval(), result


def score(
    model: torch.nn.Module, x: torch.Tensor, cfg: EvaluateConfig, precision: str, background: float
) -> torch.Tensor:
    """Log-probabilities (N, 10); with ``cfg.tta``, of the probabilities averaged over the image and its four
    one-pixel shifts (test-time augmentation)."""
    if not cfg.tta:
        return predict_log_probs(model, x, cfg.batch_size, precision)
    probs = sum(
        predict_log_probs(model, shift(x, dx, dy, background), cfg.batch_size, precision).exp() for dx, dy in TTA_SHIFTS
    )
    return (probs / len(TTA_SHIFTS)).log()


def write_reports(result: EvaluateResult, reports_dir: Path, test_images: np.ndarray) -> None:
    """The reports together: a full disk leaves none of them rather than a mixed set."""
    pairs = zip(result.actual.tolist(), result.predicted.tolist(), strict=True)
    rows = "\n".join(f"{a},{p}" for a, p in pairs)
    texts = {
        files.METRICS.name: json.dumps(result.metrics, indent=2) + "\n",
        files.PREDICTIONS.name: f"actual,predicted\n{rows}\n",
        files.CLASSIFICATION_REPORT.name: result.report,
    }
    writers = {reports_dir / name: (lambda tmp, text=text: tmp.write_text(text)) for name, text in texts.items()}
    mistakes = figures.confident_mistakes(test_images, result.actual, result.predicted, result.confidence)
    # The temporary name ends in .tmp: the format is given, not guessed from it.
    writers[reports_dir / files.CONFIDENT_MISTAKES.name] = lambda tmp: mistakes.savefig(tmp, format="png", dpi=80)
    try:
        files.write_all_atomic(writers)
    finally:
        figures.close(mistakes)


def _read_train_info(paths: Paths, params: Params) -> str:
    """The training's MLflow run id, after checking that evaluate uses the split the weights trained on."""
    info_path = paths.models / files.TRAIN_INFO.name
    try:
        info = json.loads(info_path.read_text())
        run_id = info["run_id"]
        if not isinstance(run_id, str) or not run_id:
            raise TypeError(run_id)
    except FileNotFoundError:
        raise DataError(f"{info_path}: not found (run the train stage first)") from None
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise DataError(f"{info_path}: expected JSON with a run_id (rerun the train stage)") from None
    # Before data.split_seed, train.json said "seed": then the training's seed cut the split.
    trained_split = {
        "train.val_split": info.get("val_split"),
        "data.split_seed": info.get("split_seed", info.get("seed")),
    }
    now_split = {"train.val_split": params.train.val_split, "data.split_seed": params.data.split_seed}
    for key, trained in trained_split.items():
        if trained is not None and trained != now_split[key]:
            raise DataError(
                f"{key} = {now_split[key]!r}, but the weights were trained with {trained!r} ({info_path}): the "
                "validation set would overlap the training data; rerun the train stage or restore the value"
            )
    return run_id


def run_evaluate(params: Params, paths: Paths) -> tuple[str, EvaluateResult]:
    """Evaluate into the run the train stage made; log the metrics, figures and the model.

    The run's status stays the training's; evaluate's own outcome is the tag ``evaluate.status``.
    """
    root = store.project_root(paths.root.resolve())
    run_id = _read_train_info(paths, params)
    with _evaluation_run(run_id, params, paths, root) as active:
        records.evaluation_started(params)
        _, result = evaluate(params, paths.data, paths.models, paths.reports)
        records.evaluation(
            params, paths, result.metrics, result.confusion, result.report, result.data_md5s, result.val_correct
        )
        run_id = active.info.run_id
    return run_id, result


def _evaluation_run(run_id: str, params: Params, paths: Paths, root: Path):
    """The training's run, reopened; if this store does not hold it (weights pulled from a DVC remote
    into a clone with its own store), a new run that records where the weights came from."""
    name = records.run_name("evaluate", params, paths)
    if runs.run_exists(run_id, root) or os.environ.get("MLFLOW_RUN_ID"):
        return runs.reopen(run_id, "evaluate", root=root, name=name)
    log.info(
        "run %s (models/train.json) is not in the store %s: evaluating the weights in a new run",
        run_id,
        store.tracking_uri(root),
    )
    return records.pulled_weights_run(params, paths, root, run_id, name)
