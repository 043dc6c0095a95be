"""The grid of confidently wrong digits: the surest mistakes first, right answers never shown."""

import numpy as np

from mnist_cnn.core import figures


def titles(fig):
    return [ax.get_title() for ax in fig.axes if ax.get_title()]


def test_confident_mistakes_shows_the_surest_wrong_predictions_first():
    images = np.zeros((5, 28, 28), dtype=np.uint8)
    actual = np.array([1, 2, 3, 4, 5])
    predicted = np.array([1, 7, 8, 4, 6])  # 0 and 3 right (and surest of all: never shown)
    confidence = np.array([0.99, 0.6, 0.9, 0.999, 0.75])
    fig = figures.confident_mistakes(images, actual, predicted, confidence, limit=2, columns=4)
    try:
        assert titles(fig) == ["true 3 → 8\n90.0%", "true 5 → 6\n75.0%"]
        assert "3 wrong of 5" in fig.texts[0].get_text()
    finally:
        figures.close(fig)


def test_confident_mistakes_with_none_wrong_says_so():
    fig = figures.confident_mistakes(np.zeros((2, 28, 28)), np.array([1, 2]), np.array([1, 2]), np.ones(2))
    try:
        assert titles(fig) == [] and fig.texts[0].get_text().startswith("No wrong test digits (of 2)")
    finally:
        figures.close(fig)
