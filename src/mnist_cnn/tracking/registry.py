"""The Model Registry: one version per trained weights, and the champion alias."""

from __future__ import annotations

import logging

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mnist_cnn.tracking.store import store_lock

log = logging.getLogger(__name__)


CHAMPION = "champion"


def version_with_tag(model_name: str, key: str, value: str) -> str | None:
    """The version of ``model_name`` tagged ``key=value``, if any."""
    try:
        versions = MlflowClient().search_model_versions(f"name = '{model_name}' and tags.{key} = '{value}'")
    except MlflowException:
        return None
    return str(versions[0].version) if versions else None


def champion_accuracy(client: MlflowClient, model_name: str) -> tuple[str | None, float | None]:
    """(version, test accuracy) of the current champion, or (None, None) if there is none."""
    try:
        version = client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        return None, None
    accuracy = version.tags.get("test_acc")
    if accuracy is None:
        accuracy = client.get_run(version.run_id).data.metrics.get("test_acc")
    return version.version, None if accuracy is None else float(accuracy)


def promote_if_better(model_name: str, version: str, test_acc: float) -> bool:
    """Tag ``version`` with its test accuracy; move ``champion`` to it if it beats the current champion.

    Read-compare-write under the store's lock, so parallel evaluations cannot both win.
    """
    client = MlflowClient()
    client.set_model_version_tag(model_name, version, "test_acc", f"{test_acc:.4f}")
    with store_lock():
        return _promote(client, model_name, version, test_acc)


def _promote(client: MlflowClient, model_name: str, version: str, test_acc: float) -> bool:
    current, current_acc = champion_accuracy(client, model_name)
    if current is not None and current_acc is not None and test_acc <= current_acc:
        log.info(
            "%s v%s: test acc %.2f%% does not beat champion v%s (%.2f%%); alias unchanged",
            model_name,
            version,
            test_acc,
            current,
            current_acc,
        )
        return False
    client.set_registered_model_alias(model_name, CHAMPION, version)
    log.info("%s v%s is now @%s (test acc %.2f%%)", model_name, version, CHAMPION, test_acc)
    return True
