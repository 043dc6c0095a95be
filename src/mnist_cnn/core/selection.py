"""Choosing between two models without the test set: both are scored image by image on the same
validation images, and the challenger wins only if McNemar's exact test on the images where they
disagree says it is better at the chosen significance level. A one-digit lead is not evidence."""

from __future__ import annotations

import base64
import zlib
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Scored:
    """A model's answers on the validation images: which it got right, and which images those were
    (``split``: the digest of the data files, ``train.val_split`` and ``data.split_seed``)."""

    version: str
    split: str
    correct: np.ndarray  # bool, one per validation image, in the split's order

    @property
    def accuracy(self) -> float:
        return 100.0 * float(self.correct.mean()) if len(self.correct) else 0.0


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str  # one line, for the log and the version's tags
    champion: str | None = None  # the version that held the alias before
    only_challenger: int = 0  # images the challenger got right and the champion wrong
    only_champion: int = 0  # and the other way round
    p_value: float | None = None


def encode(correct: np.ndarray) -> str:
    """``N:base64`` of the packed, compressed bits: 12,000 validation images take about 200 characters
    (a model is right on most of them), small enough for a model version tag."""
    packed = zlib.compress(np.packbits(correct.astype(bool)).tobytes(), 9)
    return f"{len(correct)}:{base64.b64encode(packed).decode()}"


def decode(text: str) -> np.ndarray:
    count, packed = text.split(":", 1)
    bits = np.unpackbits(np.frombuffer(zlib.decompress(base64.b64decode(packed)), dtype=np.uint8))
    return bits[: int(count)].astype(bool)


def mcnemar(champion: np.ndarray, challenger: np.ndarray) -> tuple[int, int, float]:
    """(only the challenger right, only the champion right, one-sided exact p-value that the challenger
    is no better): under the null hypothesis each disagreement goes either way with probability 1/2."""
    from scipy.stats import binomtest  # seconds to import; only evaluate needs it

    only_challenger = int(np.sum(challenger & ~champion))
    only_champion = int(np.sum(champion & ~challenger))
    disagreements = only_challenger + only_champion
    if disagreements == 0:
        return 0, 0, 1.0
    p_value = binomtest(only_challenger, disagreements, 0.5, alternative="greater").pvalue
    return only_challenger, only_champion, float(p_value)


def decide(challenger: Scored, champion: Scored | None, alpha: float, champion_version: str | None = None) -> Decision:
    """Whether ``challenger`` takes the alias from ``champion`` (None: there is none, or, with
    ``champion_version``, that version has no validation record to compare with)."""
    if champion is None and champion_version is None:
        return Decision(True, "no champion yet")
    if champion is None:
        return Decision(
            False,
            f"champion v{champion_version} has no validation record (registered before selection on validation):"
            " not compared",
            champion_version,
        )
    if champion.split != challenger.split or len(champion.correct) != len(challenger.correct):
        return Decision(
            False,
            f"champion v{champion.version} was scored on other validation images (another data, train.val_split"
            " or data.split_seed): not compared",
            champion.version,
        )
    wins, losses, p_value = mcnemar(champion.correct, challenger.correct)
    reason = (
        f"validation {challenger.accuracy:.2f}% vs champion v{champion.version} {champion.accuracy:.2f}% on the same"
        f" {len(challenger.correct)} images; right where v{champion.version} was wrong: {wins}, wrong where it was"
        f" right: {losses}; McNemar p = {p_value:.3g} {'<' if p_value < alpha else '>='} {alpha:g}"
    )
    return Decision(p_value < alpha, reason, champion.version, wins, losses, p_value)
