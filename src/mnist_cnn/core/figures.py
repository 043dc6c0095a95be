"""Matplotlib figures logged to MLflow: learning curves, the confusion matrix, the confidently wrong digits."""

from __future__ import annotations

import matplotlib
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

matplotlib.use("Agg")  # no display on servers and CI


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


def confident_mistakes(
    images: np.ndarray,
    actual: np.ndarray,
    predicted: np.ndarray,
    confidence: np.ndarray,
    limit: int = 24,
    columns: int = 8,
) -> Figure:
    """The wrong predictions the model was surest of, surest first: each digit with its true and
    predicted class and the probability given to the prediction. These are where mislabelled test
    digits and the model's blind spots show up; a low-confidence mistake says little."""
    wrong = np.flatnonzero(actual != predicted)
    shown = wrong[np.argsort(-confidence[wrong], kind="stable")][:limit]
    rows = max(1, -(-len(shown) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.9 * rows + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, shown, strict=False):
        ax.imshow(images[i], cmap="gray_r", vmin=0, vmax=255)
        ax.set_title(f"true {actual[i]} → {predicted[i]}\n{confidence[i]:.1%}", fontsize=9)
    total = len(actual)
    heading = f"Most confidently wrong test digits ({len(wrong)} wrong of {total})"
    if not len(wrong):
        heading = f"No wrong test digits (of {total})"
    fig.suptitle(heading + "\ntrue class → predicted class, probability of the prediction", fontsize=10)
    fig.tight_layout()
    return fig


def close(fig: Figure) -> None:
    plt.close(fig)
