"""The model card's content from known facts: per-digit accuracy and confused pairs from a confusion
matrix worked by hand, the data's MD5s, the decision and the commit."""

from __future__ import annotations

import numpy as np

from mnist_cnn.core.model_card import CardFacts, model_card, most_confused, per_class_accuracy


def test_per_digit_accuracy_and_the_most_confused_pairs():
    confusion = np.diag([10] * 10)
    confusion[4, 9], confusion[7, 1], confusion[3, 5] = 5, 2, 1  # 4 read as 9 five times, ...
    accuracy = per_class_accuracy(confusion)
    assert accuracy[4] == 100 * 10 / 15 and accuracy[0] == 100.0
    assert most_confused(confusion) == [(4, 9, 5), (7, 1, 2), (3, 5, 1)]
    assert most_confused(np.diag([3] * 10)) == []


def test_the_card_says_what_it_is_for_where_it_came_from_and_why_it_is_champion():
    confusion = np.diag([10] * 10)
    confusion[4, 9] = 5
    card = model_card(
        CardFacts(
            model_name="mnist-cnn",
            version="7",
            run_id="abc123",
            dataset="mnist",
            data_md5s={"t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3"},
            params={"train.val_split": 0.2, "data.split_seed": 1, "data.drop_test_duplicates": False, "train.lr": 0.43},
            metrics={"train": {"loss": 0.02, "accuracy": 99.3}, "test": {"loss": 0.03, "accuracy": 98.88}},
            confusion=confusion,
            decision="promoted: no champion yet",
            commit="1be09eb",
            dirty="false",
        )
    )
    assert card.startswith("# mnist-cnn v7\n")
    for line in (
        "A convolutional network that reads one handwritten digit (mnist). Test accuracy **98.88%**; trained in"
        " MLflow run `abc123`.",
        "## Intended use and limits",
        "- `t10k-images-idx3-ubyte.gz`: MD5 `9fb629c4189551a2d022fa330f9573f3`",
        "- Validation: 20% of the training file, cut with `data.split_seed` 1; the champion is chosen on it,"
        " the test set is only reported.",
        "| `train.lr` | 0.43 |",
        "| test | 0.0300 | 98.88% |",
        "- 4 → 9: 5 images",
        "promoted: no champion yet",
        "Commit `1be09eb`.",
    ):
        assert line in card.splitlines(), line
