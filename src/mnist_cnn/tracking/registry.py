"""The Model Registry: one version per trained weights, and the champion alias."""

from __future__ import annotations

import logging

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mnist_cnn.core.errors import masked
from mnist_cnn.core.selection import Decision, Scored, decide, decode, encode
from mnist_cnn.tracking.store import TrackingError, store_lock

log = logging.getLogger(__name__)


CHAMPION = "champion"


def version_with_tag(model_name: str, key: str, value: str) -> str | None:
    """The version of ``model_name`` tagged ``key=value``, if any."""
    try:
        versions = MlflowClient().search_model_versions(f"name = '{model_name}' and tags.{key} = '{value}'")
    except MlflowException:
        return None
    return str(versions[0].version) if versions else None


# A version's record of its validation answers, and of the decision about the alias.
SPLIT_TAG, CORRECT_TAG, VAL_ACC_TAG = "selection.split", "selection.correct", "selection.val_acc"
DECISION_TAG, REASON_TAG, BEFORE_TAG, P_VALUE_TAG = (
    "promotion.decision",
    "promotion.reason",
    "promotion.champion_before",
    "promotion.p_value",
)


def champion_version(client: MlflowClient, model_name: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(model_name, CHAMPION).version)
    except MlflowException:
        return None


def scored_version(client: MlflowClient, model_name: str, version: str) -> Scored | None:
    """What ``version`` recorded of its validation answers; None for a version registered before that."""
    tags = client.get_model_version(model_name, version).tags
    if SPLIT_TAG not in tags or CORRECT_TAG not in tags:
        return None
    return Scored(version, tags[SPLIT_TAG], decode(tags[CORRECT_TAG]))


def record_answers(client: MlflowClient, model_name: str, scored: Scored, test_acc: float) -> None:
    """The version's validation answers (and, for the reader, its test accuracy: never the rule)."""
    record = {
        "test_acc": f"{test_acc:.4f}",
        SPLIT_TAG: scored.split,
        CORRECT_TAG: encode(scored.correct),
        VAL_ACC_TAG: f"{scored.accuracy:.4f}",
    }
    for key, value in record.items():
        client.set_model_version_tag(model_name, scored.version, key, value)


def promote_on_validation(model_name: str, challenger: Scored, test_acc: float, alpha: float) -> Decision:
    """Record ``challenger``'s validation answers (and, for the reader, its test accuracy: never the rule);
    move ``champion`` to it if it beats the champion on the same validation images (``selection.decide``).

    Read-compare-write under the store's lock, so parallel evaluations cannot both win, and each decision
    names the champion it was compared with (``promotion.champion_before``)."""
    client = MlflowClient()
    version = challenger.version
    record_answers(client, model_name, challenger, test_acc)
    with store_lock():
        current = champion_version(client, model_name)
        champion = scored_version(client, model_name, current) if current is not None else None
        decision = decide(challenger, champion, alpha, current)
        if decision.promote:
            client.set_registered_model_alias(model_name, CHAMPION, version)
        _record_decision(client, model_name, version, decision)
    if decision.promote:
        log.info("%s v%s is now @%s (%s)", model_name, version, CHAMPION, decision.reason)
    else:
        log.info("%s v%s: @%s stays on v%s (%s)", model_name, version, CHAMPION, decision.champion, decision.reason)
    return decision


def _record_decision(client: MlflowClient, model_name: str, version: str, decision: Decision) -> None:
    tags = {
        DECISION_TAG: "promoted" if decision.promote else "kept",
        REASON_TAG: decision.reason,
        BEFORE_TAG: decision.champion or "",
        **({P_VALUE_TAG: f"{decision.p_value:.6g}"} if decision.p_value is not None else {}),
    }
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value)


def force_champion(model_name: str, version: str, user: str, why: str) -> str | None:
    """Move ``champion`` to ``version`` by hand, whatever the rule says; record who and why. Returns the
    version that held it before."""
    client = MlflowClient()
    try:
        client.get_model_version(model_name, version)
    except MlflowException:
        raise TrackingError(f"{model_name!r} has no version {version} in {masked(mlflow.get_tracking_uri())}") from None
    with store_lock():
        before = champion_version(client, model_name)
        client.set_registered_model_alias(model_name, CHAMPION, version)
        reason = f"forced by {user}: {why}" if why else f"forced by {user}"
        _record_decision(client, model_name, version, Decision(True, reason, before))
    log.info("%s v%s is now @%s (%s)", model_name, version, CHAMPION, reason)
    return before
