"""MLflow: one run per training, shared by the train and evaluate stages; a champion alias in the registry.

Every stage reaches MLflow through this module, so the store, the run and the names are decided here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from .config import parse_value

log = logging.getLogger(__name__)

CHAMPION = "champion"
STORE_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"


def project_root(cwd: Path | None = None) -> Path:
    """The project directory; inside ``dvc exp run --temp`` (``<root>/.dvc/tmp/exps/...``) the real one."""
    cwd = (cwd or Path.cwd()).resolve()
    parts = cwd.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return cwd


def tracking_uri(root: Path | None = None) -> str:
    """``$MLFLOW_TRACKING_URI`` if set (relative SQLite paths made absolute), else ``<root>/mlflow.db``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        return f"sqlite:///{(root or project_root()) / STORE_FILE}"
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not Path(uri[len(prefix) :]).is_absolute():
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def configure(root: Path | None = None) -> str:
    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def experiment_id(name: str, root: Path | None = None) -> str:
    """The id of experiment ``name``, created with artifacts beside the store if it is new."""
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifacts = None
    if mlflow.get_tracking_uri().startswith("sqlite:"):
        artifacts = ((root or project_root()) / ARTIFACTS_DIR).as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=artifacts)
    except MlflowException:  # created meanwhile by a parallel run
        return mlflow.get_experiment_by_name(name).experiment_id


def git_lineage(root: Path) -> dict[str, str]:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": "unknown", "git_dirty": "unknown"}
    return {"git_commit": commit, "git_dirty": str(dirty).lower()}


def log_params_once(params: Mapping[str, Any]) -> None:
    """Log params to the active run, skipping keys it already holds (e.g. logged by ``mlflow run -P``).

    MLflow refuses to change a logged value; a key already there with another value is reported,
    not raised, since the run's own value is what that run used.
    """
    run = mlflow.active_run()
    existing = MlflowClient().get_run(run.info.run_id).data.params
    new = {}
    for key, value in params.items():
        if key not in existing:
            new[key] = value
        elif parse_value(existing[key]) != value and existing[key] != str(value):
            log.warning(
                "param %s already logged as %r in run %s; not changed to %r",
                key,
                existing[key],
                run.info.run_id,
                value,
            )
    if new:
        mlflow.log_params(new, synchronous=True)


def _raise_keyboard_interrupt(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def run(experiment: str, run_id: str | None = None, root: Path | None = None) -> Iterator[mlflow.ActiveRun]:
    """Start (or, with ``run_id`` / ``$MLFLOW_RUN_ID``, reopen) a run; end it FINISHED, FAILED or KILLED.

    SIGTERM is turned into an interrupt for the duration, so a killed stage ends its run KILLED
    rather than leaving it RUNNING.
    """
    configure(root)
    run_id = os.environ.get("MLFLOW_RUN_ID") or run_id
    kwargs = {"run_id": run_id} if run_id else {"experiment_id": experiment_id(experiment, root)}
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    active = mlflow.start_run(**kwargs)
    status = "FAILED"
    try:
        yield active
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        try:
            mlflow.flush_async_logging()
        finally:
            mlflow.end_run(status)
            signal.signal(signal.SIGTERM, previous)


class EpochLogger:
    """The train loop's reporter: per-epoch metrics with ``step=epoch``, logged asynchronously."""

    def log_epoch(self, stats) -> None:
        mlflow.log_metrics(
            {
                "train_loss": stats.train_loss,
                "train_acc": stats.train_acc,
                "val_loss": stats.val_loss,
                "val_acc": stats.val_acc,
                "lr": stats.lr,
                "epoch_seconds": stats.epoch_seconds,
            },
            step=stats.epoch,
            synchronous=False,
        )


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
    """Tag ``version`` with its test accuracy; move ``champion`` to it if it beats the current champion."""
    client = MlflowClient()
    client.set_model_version_tag(model_name, version, "test_acc", f"{test_acc:.4f}")
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
