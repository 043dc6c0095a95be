"""The model card of a registered version: what the model is for and not for, the data it learnt from,
how it was trained and how it scored, and why it is (or is not) the champion. Markdown: MLflow shows it
as the version's description, and it is an artifact of the run (``model_card.md``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

INTENDED_USE = """\
## Intended use and limits

- **For** one handwritten digit per image: 28×28 grayscale, raw 0–255 pixels, a light digit on a dark
  background, centred by its centre of mass in a 20×20 box, as MNIST's are. `python -m mnist_cnn predict`
  brings photos and scans (any size, dark ink on white paper) to that form first.
- **Not for** letters, several digits in one image, or images that hold no digit: the model always answers
  one of 0–9, with a probability that is not a calibrated confidence on such input.
- Its accuracy is measured on MNIST's test set (handwriting of American Census employees and
  high-school students); on other writers, pens and scanners it is unmeasured.
"""


@dataclass(frozen=True)
class CardFacts:
    model_name: str
    version: str
    run_id: str
    dataset: str
    data_md5s: Mapping[str, str]
    params: Mapping[str, Any]  # flat, dotted keys: the data, model and train sections
    metrics: Mapping[str, Mapping[str, float]]  # {"train"|"val"|"test": {"loss", "accuracy"}}
    confusion: np.ndarray  # test set, rows = actual
    decision: str  # the promotion's outcome and reason, one line
    commit: str
    dirty: str


def model_card(facts: CardFacts) -> str:
    return "\n".join(
        [
            f"# {facts.model_name} v{facts.version}",
            "",
            f"A convolutional network that reads one handwritten digit ({facts.dataset}). "
            f"Test accuracy **{facts.metrics['test']['accuracy']:.2f}%**; trained in MLflow run `{facts.run_id}`.",
            "",
            INTENDED_USE,
            _data(facts),
            _training(facts),
            _scores(facts),
            "## Champion",
            "",
            facts.decision,
            "",
            "## Code",
            "",
            f"Commit `{facts.commit}`" + (" with uncommitted changes." if facts.dirty == "true" else "."),
            "",
        ]
    )


def _data(facts: CardFacts) -> str:
    p = facts.params
    lines = ["## Data", ""]
    lines += [f"- `{name}`: MD5 `{md5}`" for name, md5 in sorted(facts.data_md5s.items())]
    lines += [
        f"- Validation: {100 * p['train.val_split']:g}% of the training file, cut with `data.split_seed` "
        f"{p['data.split_seed']}; the champion is chosen on it, the test set is only reported.",
        f"- Test images also in the training file left out of training: "
        f"{'yes' if p['data.drop_test_duplicates'] else 'no'} (`data.drop_test_duplicates`).",
        "",
    ]
    return "\n".join(lines)


def _training(facts: CardFacts) -> str:
    rows = [f"| `{key}` | {value} |" for key, value in sorted(facts.params.items())]
    return "\n".join(["## Training", "", "| param | value |", "|---|---|", *rows, ""])


def _scores(facts: CardFacts) -> str:
    lines = ["## Scores", "", "| split | loss | accuracy |", "|---|---|---|"]
    lines += [f"| {split} | {m['loss']:.4f} | {m['accuracy']:.2f}% |" for split, m in facts.metrics.items()]
    per_class = per_class_accuracy(facts.confusion)
    lines += ["", "Test accuracy per digit:", "", "| " + " | ".join(map(str, range(len(per_class)))) + " |"]
    lines += ["|" + "---|" * len(per_class), "| " + " | ".join(f"{a:.1f}%" for a in per_class) + " |", ""]
    pairs = most_confused(facts.confusion)
    if pairs:
        lines += ["Most confused on the test set (actual → predicted):", ""]
        lines += [f"- {actual} → {predicted}: {count} images" for actual, predicted, count in pairs]
        lines.append("")
    return "\n".join(lines)


def per_class_accuracy(confusion: np.ndarray) -> list[float]:
    totals = confusion.sum(axis=1)
    return [100.0 * confusion[k, k] / totals[k] if totals[k] else 0.0 for k in range(len(confusion))]


def most_confused(confusion: np.ndarray, top: int = 3) -> list[tuple[int, int, int]]:
    """The ``top`` (actual, predicted, count) pairs with the most mistakes, most first."""
    off = confusion.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(off, axis=None)[::-1][:top]
    pairs = [(int(i), int(j), int(off[i, j])) for i, j in zip(*np.unravel_index(order, off.shape), strict=True)]
    return [pair for pair in pairs if pair[2] > 0]
