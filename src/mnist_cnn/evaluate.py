"""Evaluate stage: train, validation and test loss and accuracy; confusion matrix; classification report;
the grid of the most confidently wrong test digits."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import classification_report, confusion_matrix

from . import figures, layout
from .augment import TTA_SHIFTS, shift
from .config import EvaluateConfig, Params
from .data import load_split, normalise, verified_md5s
from .model import NUM_CLASSES, Net, load_weights
from .runtime import select_device, select_precision
from .train import load_train_val, loss_and_accuracy, predict_log_probs, prepare_model


@dataclass(frozen=True)
class EvaluateResult:
    metrics: dict[str, dict[str, float]]  # {"train"|"val"|"test": {"loss": ..., "accuracy": ...}}
    confusion: np.ndarray  # (10, 10) counts, rows = actual, columns = predicted
    report: str  # scikit-learn's classification report on the test set
    actual: np.ndarray
    predicted: np.ndarray
    confidence: np.ndarray  # the probability each test prediction was given
    data_md5s: dict[str, str] = field(default_factory=dict)  # {data file: MD5}, as verified


def evaluate(
    params: Params,
    data_dir: Path = layout.DATA_DIR,
    model_dir: Path = layout.MODEL_DIR,
    reports_dir: Path = layout.REPORTS_DIR,
) -> tuple[Net, EvaluateResult]:
    """Score the trained weights on the three splits and write the metrics, predictions and report."""
    md5s = verified_md5s(data_dir, params.data.dataset)
    device = select_device(params.train.device)
    precision = select_precision(params.train.precision, device)
    net = load_weights(params.model, Path(model_dir) / layout.WEIGHTS.name, device)
    model = prepare_model(net, device)
    train_data, val_data = load_train_val(
        data_dir, params.data.dataset, params.train.val_split, params.train.seed, device
    )
    test = load_split(data_dir, train=False)
    splits = {
        "train": (train_data.x, train_data.y),
        "val": (val_data.x, val_data.y),
        "test": (normalise(test.images, params.data.dataset).to(device), test.labels.to(device)),
    }
    background = train_data.x.amin().item()  # the normalised value of a blank pixel
    metrics, test_log_probs = {}, None
    for name, (x, y) in splits.items():
        log_probs = score(model, x, params.evaluate, precision, background)
        loss, accuracy = loss_and_accuracy(log_probs, y)
        metrics[name] = {"loss": round(loss, 6), "accuracy": round(accuracy, 4)}
        test_log_probs = log_probs
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
        layout.METRICS.name: json.dumps(result.metrics, indent=2) + "\n",
        layout.PREDICTIONS.name: f"actual,predicted\n{rows}\n",
        layout.CLASSIFICATION_REPORT.name: result.report,
    }
    writers = {reports_dir / name: (lambda tmp, text=text: tmp.write_text(text)) for name, text in texts.items()}
    mistakes = figures.confident_mistakes(test_images, result.actual, result.predicted, result.confidence)
    # The temporary name ends in .tmp: the format is given, not guessed from it.
    writers[reports_dir / layout.CONFIDENT_MISTAKES.name] = lambda tmp: mistakes.savefig(tmp, format="png", dpi=80)
    try:
        layout.write_all_atomic(writers)
    finally:
        figures.close(mistakes)


__all__ = ["EvaluateResult", "evaluate"]
