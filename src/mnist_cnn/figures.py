"""Matplotlib figures logged to MLflow: learning curves and the confusion matrix."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def learning_curves(history) -> Figure:
    epochs = [s.epoch for s in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    loss_ax.plot(epochs, [s.train_loss for s in history], label="train")
    loss_ax.plot(epochs, [s.val_loss for s in history], label="validation")
    loss_ax.set(xlabel="epoch", ylabel="loss", yscale="log", title="Loss")
    acc_ax.plot(epochs, [s.train_acc for s in history], label="train")
    acc_ax.plot(epochs, [s.val_acc for s in history], label="validation")
    acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
    for ax in (loss_ax, acc_ax):
        ax.legend()
        ax.grid(alpha=0.3)
    return fig


def normalise_rows(counts: np.ndarray) -> np.ndarray:
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros(counts.shape, dtype=float), where=totals > 0)


def confusion_matrix_figure(counts: np.ndarray) -> Figure:
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), constrained_layout=True)
    panels = ((counts, "Counts", "d"), (normalise_rows(counts), "Normalised by actual class", ".3f"))
    for ax, (matrix, title, fmt) in zip(axes, panels, strict=True):
        ax.imshow(matrix, cmap="Blues")
        threshold = matrix.max() / 2 if matrix.max() > 0 else 0
        for (i, j), value in np.ndenumerate(matrix):
            ax.text(
                j,
                i,
                format(value, fmt),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if value > threshold else "black",
            )
        ticks = range(len(matrix))
        ax.set(xticks=ticks, yticks=ticks, xlabel="predicted", ylabel="actual", title=title)
    return fig


def close(fig: Figure) -> None:
    plt.close(fig)
