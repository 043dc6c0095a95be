"""What a person reads first about a run: its name, how it was launched, and a one-paragraph description.

Plain functions of the environment and of values already at hand; ``tracking`` puts them on the run.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from mnist_cnn.core.params import ALIASES, Params, flatten

LAUNCH_TAG = "launched_by"


DESCRIPTION_TAG = "mlflow.note.content"  # what the MLflow UI shows as the run's description


NAME_MAX = 250  # MLflow refuses longer run names


# Set by DVC 3.67 for every stage command (`dvc repro`, and the stages of `dvc exp run`).
DVC_STAGE_ENV = ("DVC_STAGE", "DVC_ROOT")


# Set by `dvc exp run` (workspace, --temp or queued) on top of those: the experiment's name.
DVC_EXP_ENV = "DVC_EXP_NAME"


# `mlflow run` creates the run first, passes it in MLFLOW_RUN_ID and tags it mlflow.source.type=PROJECT.
MLFLOW_RUN_ENV = "MLFLOW_RUN_ID"


_SHORT_NAMES = {dotted: short for short, dotted in ALIASES.items()}


def launcher(env: Mapping[str, str] | None = None, source_type: str | None = None) -> str:
    """How this process was started: ``dvc exp run``, ``dvc repro``, ``mlflow run`` or ``cli``.

    ``source_type`` is the run's ``mlflow.source.type`` tag when ``$MLFLOW_RUN_ID`` named the run.
    """
    env = os.environ if env is None else env
    if env.get(DVC_EXP_ENV):
        return "dvc exp run"
    if any(env.get(name) for name in DVC_STAGE_ENV):
        return "dvc repro"
    if env.get(MLFLOW_RUN_ENV) and source_type == "PROJECT":
        return "mlflow run"
    return "cli"


def changed_params(params: Params, base: Params | None) -> dict[str, Any]:
    """The params whose value differs from ``base`` (the params file), in the file's order."""
    if base is None:
        return {}
    defaults = flatten(base)
    return {key: value for key, value in flatten(params).items() if defaults.get(key) != value}


def _format_value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def run_name(stage: str, changed: Mapping[str, Any], env: Mapping[str, str] | None = None) -> str:
    """``$DVC_EXP_NAME`` under ``dvc exp run``; otherwise the stage and what differs, ``train lr=0.2 epochs=3``."""
    env = os.environ if env is None else env
    if env.get(DVC_EXP_ENV):
        return env[DVC_EXP_ENV][:NAME_MAX]
    parts = [stage, *(f"{_SHORT_NAMES.get(key, key)}={_format_value(value)}" for key, value in changed.items())]
    return " ".join(parts)[:NAME_MAX]


def _number(facts: Mapping[str, Any], key: str) -> float | None:
    try:
        return float(facts[key])
    except (KeyError, TypeError, ValueError):
        return None


def description(facts: Mapping[str, Any]) -> str:
    """One paragraph from a run's metrics, params and tags merged into ``facts`` (names as logged).

    Written by train (test accuracy still pending) and rewritten by evaluate once it is known.
    """
    test_acc, test_loss = _number(facts, "test_acc"), _number(facts, "test_loss")
    if test_acc is None:
        first = "Test accuracy: not evaluated yet (the evaluate stage adds it)."
    else:
        loss = f" (loss {test_loss:.4f})" if test_loss is not None else ""
        first = f"**Test accuracy {test_acc:.2f}%**{loss} on {facts.get('data.dataset', 'the test set')}."
    sentences = [first]
    best, stopped = _number(facts, "best_epoch"), _number(facts, "stopped_epoch")
    if best is not None and stopped is not None:
        budget = _number(facts, "train.epochs")
        of = f" of {budget:.0f}" if budget is not None else ""
        val, acc = _number(facts, "best_val_loss"), _number(facts, "best_val_acc")
        val_text = f", validation loss {val:.4f}" if val is not None else ""
        if facts.get("train.monitor") == "val_acc" and acc is not None:
            loss = f", loss {val:.4f}" if val is not None else ""
            val_text = f" by validation accuracy ({acc:.2f}%{loss})"
        sentences.append(f"Best epoch {best:.0f}{val_text}; stopped after epoch {stopped:.0f}{of}.")
    seconds = _number(facts, "train_seconds")
    if "device" in facts:
        took = f", {seconds:.0f} s of training" if seconds is not None else ""
        sentences.append(f"Trained on {facts['device']} in {facts.get('precision', '?')}{took}.")
    commit = str(facts.get("git_commit", "unknown"))
    dirty = " with uncommitted changes" if facts.get("git_dirty") == "true" else ""
    sentences.append(f"Code: commit {commit[:10]}{dirty}.")
    if LAUNCH_TAG in facts:
        sentences.append(f"Launched by {facts[LAUNCH_TAG]}.")
    return " ".join(sentences)
