"""The promotion rule on its own: validation answers kept compactly, McNemar's exact test against the
binomial numbers worked by hand, and what is never compared."""

from __future__ import annotations

import numpy as np
import pytest

from mnist_cnn.core.selection import Scored, decide, decode, encode, mcnemar


def test_answers_round_trip_in_a_tag_sized_text():
    rng = np.random.default_rng(0)
    correct = rng.random(12_000) < 0.99  # a model right on 99% of 12,000 validation images
    text = encode(correct)
    assert np.array_equal(decode(text), correct)
    assert len(text) < 1_000  # a model version tag holds up to 5,000 characters
    odd = np.array([True, False, True])  # not a multiple of 8: the padding bits are dropped
    assert np.array_equal(decode(encode(odd)), odd)


def test_mcnemar_counts_only_the_disagreements():
    champion = np.array([True] * 90 + [False] * 10)
    challenger = champion.copy()
    challenger[90:97] = True  # right on 7 images the champion missed
    challenger[0] = False  # wrong on 1 it got
    wins, losses, p_value = mcnemar(champion, challenger)
    # P(X >= 7) for X ~ Binomial(8, 1/2) = (C(8,7) + C(8,8)) / 2^8 = 9/256
    assert (wins, losses) == (7, 1) and p_value == pytest.approx(9 / 256)
    assert mcnemar(champion, champion) == (0, 0, 1.0)


def test_a_better_test_accuracy_alone_never_decides():
    same = np.ones(100, dtype=bool)
    champion, challenger = Scored("1", "s", same), Scored("2", "s", same.copy())
    decision = decide(challenger, champion, alpha=0.05)
    assert not decision.promote and decision.p_value == 1.0
    # 9/256 = 0.035: promoted at 0.05, not at 0.01.
    champion = Scored("1", "s", np.array([True] * 90 + [False] * 10))
    answers = champion.correct.copy()
    answers[90:97], answers[0] = True, False
    assert decide(Scored("2", "s", answers), champion, alpha=0.05).promote
    assert not decide(Scored("2", "s", answers), champion, alpha=0.01).promote
    assert not decide(Scored("2", "other", answers), champion, alpha=0.05).promote
    assert decide(Scored("2", "s", answers), None, alpha=0.05).promote
