"""One MLflow run per training: started or reopened, ended FINISHED, FAILED or KILLED, and what it logs."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mlflow
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mnist_cnn.core.errors import masked, one_line
from mnist_cnn.core.params import parse_value
from mnist_cnn.ops import signals
from mnist_cnn.ops.signals import signals_deferred
from mnist_cnn.tracking import runmeta, store
from mnist_cnn.tracking.owners import close_stale_runs, owner_tags
from mnist_cnn.tracking.store import (
    ServerUnreachable,
    TrackingError,
    artifacts_not_stored,
    check_server,
    configure,
    experiment_id,
    permission_refused,
)

log = logging.getLogger(__name__)


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


def _end(status: str) -> None:
    with signals_deferred():
        try:
            mlflow.flush_async_logging()
        finally:
            mlflow.end_run(status)


class ServerLost(TrackingError):
    """The tracking server stopped answering while a run was open: the run could not be ended."""


def lost_server(exc: BaseException) -> str | None:
    """Why the tracking server no longer answers, if it does not and ``exc`` is a failed request to it
    (a bug of ours, or a refusal from a live server, is not a lost server)."""
    import requests

    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return None
    if not isinstance(exc, (MlflowException, requests.RequestException, ConnectionError)):
        return None
    try:
        check_server(uri)
    except ServerUnreachable as gone:
        return gone.reason
    except TrackingError:  # it answers, if only to refuse
        return None
    return None


def server_lost(reason: str, active: mlflow.ActiveRun | None) -> ServerLost:
    server = f"tracking server {masked(mlflow.get_tracking_uri())}"
    if active is None:
        return ServerLost(f"{server} stopped answering before the run started ({reason})")
    return ServerLost(
        f"{server} stopped answering during run {active.info.run_id} ({reason}); the run stays RUNNING"
        " until the next training or `python -m mnist_cnn runs --clean` closes it"
    )


def _end_without_server(status: str) -> None:
    """Leave the run locally, one quick try to end it on the server: with the server gone, MLflow's
    retries would only add minutes and a second error over the first."""
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    saved = {name: os.environ.get(name) for name in quick}
    os.environ.update(quick)
    try:
        with contextlib.suppress(Exception):
            _end(status)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def name_project_run(run_id: str, name: str | None) -> None:
    """Name a run that ``mlflow run`` created (MLflow gave it a random name) and tag how it was
    launched, once: the first stage to reach it names it, later stages and resumed runs keep that."""
    client = MlflowClient()
    tags = client.get_run(run_id).data.tags
    if runmeta.LAUNCH_TAG in tags:
        return
    if name:
        client.update_run(run_id, name=name)
    client.set_tag(run_id, runmeta.LAUNCH_TAG, runmeta.launcher(source_type=tags.get("mlflow.source.type")))


@contextlib.contextmanager
def run(
    experiment: str,
    run_id: str | None = None,
    root: Path | None = None,
    *,
    name: str | None = None,
    system_metrics: bool = False,
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    ended_as: Mapping[type[BaseException], str] | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Start (or, with ``run_id`` / ``$MLFLOW_RUN_ID``, reopen) a run; end it FINISHED, FAILED or KILLED.

    A new run is called ``name`` and tagged with how it was launched (``runmeta.launcher``); so is a
    run ``mlflow run`` made. With ``system_metrics``, MLflow samples CPU, memory (and NVIDIA GPUs)
    into ``system/*`` metrics while the run is open.

    SIGTERM is turned into an interrupt for the duration, so a killed stage ends its run KILLED
    rather than leaving it RUNNING; interrupts that arrive while the run is being ended wait for it.
    Runs of this experiment left RUNNING by dead processes of this host are closed first.
    A new run can be nested under ``parent_run_id``; ``ended_as`` maps exceptions that are not failures
    (a pruned Optuna trial) to the status they end the run with (they are re-raised all the same).
    """
    configure(root)
    # A trial nested under a study's parent is a run of its own, never the one `mlflow run` made.
    project_run = None if parent_run_id else os.environ.get("MLFLOW_RUN_ID")
    run_id = project_run or run_id
    exp_id = experiment_id(experiment, root)
    close_stale_runs([exp_id], keep=run_id)
    # A new run carries its owner from its first moment: an interrupt cannot leave it ownerless.
    if run_id:
        kwargs = {"run_id": run_id}
    else:
        tags = {**(tags or {}), **owner_tags(), runmeta.LAUNCH_TAG: runmeta.launcher()}
        kwargs = {"experiment_id": exp_id, "run_name": name, "tags": tags, "parent_run_id": parent_run_id}
    with signals.stop_signals_interrupt():
        # None, not False, without system_metrics: MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING still applies.
        # Started with SIGINT/SIGTERM held, so that a run is never left half-started (its system-metrics
        # thread running): an interrupt held meanwhile is raised on leaving that block, inside the try,
        # so the run ends KILLED.
        status, ended, active = "FAILED", False, None
        try:
            with signals_deferred():
                active = _start_run(experiment, kwargs, system_metrics)
            if run_id:  # a reopened run changes owner; a new one got its owner at creation
                mlflow.set_tags(owner_tags())
            if project_run:
                name_project_run(project_run, name)
            yield active
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        except BaseException as exc:
            status = next((s for kind, s in (ended_as or {}).items() if isinstance(exc, kind)), "FAILED")
            reason = lost_server(exc)
            if reason is None:
                ran = active is not None  # a run that never started stored nothing
                not_stored = artifacts_not_stored(exc, active.info.run_id, "the run ends FAILED") if ran else None
                if not_stored is None:
                    raise
                raise not_stored from None
            _end_without_server(status)
            ended = True
            raise server_lost(reason, active) from None
        finally:
            if not ended:
                _end(status)


def _start_run(experiment: str, kwargs: dict, system_metrics: bool) -> mlflow.ActiveRun:
    try:
        return mlflow.start_run(**kwargs, log_system_metrics=True if system_metrics else None)
    except MlflowException as exc:
        if exc.error_code != "PERMISSION_DENIED":
            raise
        raise permission_refused(experiment) from None


@contextlib.contextmanager
def reopen(run_id: str, stage: str, root: Path | None = None, name: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """Log into a finished run without rewriting its history: the run's status stays what training
    made it, and this stage's outcome is the tag ``<stage>.status`` (FINISHED, FAILED or KILLED, with
    ``<stage>.error``). A run ``mlflow run`` made for this stage alone is called ``name``."""
    configure(root)
    project_run = os.environ.get("MLFLOW_RUN_ID")
    run_id = project_run or run_id
    try:
        was = MlflowClient().get_run(run_id).info.status
    except MlflowException:
        raise TrackingError(
            f"run {run_id} (from models/train.json) is not in the store {mlflow.get_tracking_uri()}; "
            "rerun the train stage"
        ) from None
    # A run still RUNNING is one `mlflow run` started for train and evaluate together.
    final = was if RunStatus.is_terminated(RunStatus.from_string(was)) else None
    with signals.stop_signals_interrupt():
        active = mlflow.start_run(run_id=run_id)
        outcome, error = "FAILED", None
        try:
            mlflow.set_tag(f"{stage}.status", "RUNNING")
            if project_run:
                name_project_run(project_run, name)
            yield active
            outcome = "FINISHED"
        except KeyboardInterrupt:
            outcome = "KILLED"
            raise
        except Exception as exc:
            run_is = f"the run stays {final}" if final else "the run ends FAILED"  # as `_end` below leaves it
            then = f"{run_is}, {stage}.status FAILED; rerun {stage} once it is back"
            not_stored = artifacts_not_stored(exc, run_id, then)
            if not_stored is None:
                error = one_line(exc)
                raise
            error = str(not_stored)
            raise not_stored from None
        finally:
            with signals_deferred():
                mlflow.set_tags({f"{stage}.status": outcome, **({f"{stage}.error": error[:5000]} if error else {})})
            _end(final or outcome)


def run_exists(run_id: str, root: Path | None = None) -> bool:
    """Whether ``run_id`` is in the store and not deleted (a deleted run cannot be reopened)."""
    configure(root)
    try:
        return MlflowClient().get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException:
        return False


def describe_active_run() -> None:
    """Write the run's description (the paragraph the MLflow UI shows first) from what the run holds."""
    run = MlflowClient().get_run(mlflow.active_run().info.run_id)
    facts = {**run.data.params, **run.data.metrics, **run.data.tags}
    mlflow.set_tag(runmeta.DESCRIPTION_TAG, runmeta.description(facts))


# What every split holds: the IDX arrays as read (uint8 images, uint8 labels).
DATASET_SCHEMA_SPECS = (("images", "uint8", (-1, 28, 28)), ("labels", "uint8", (-1,)))


def log_datasets(name: str, source: str, digests: Mapping[str, str], tags: Mapping[str, str] | None = None) -> None:
    """Record the data in MLflow's dataset tracking (the runs table's Datasets column): one entry per
    ``{context: digest}``, e.g. ``training``. Metadata only: the digests come from the files' MD5s,
    which the stage computed anyway, so nothing is hashed or copied again."""
    import numpy as np
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types import Schema, TensorSpec

    schema = Schema([TensorSpec(np.dtype(dtype), shape, spec) for spec, dtype, shape in DATASET_SCHEMA_SPECS])
    with warnings.catch_warnings():
        # MLflow registers its local-file source twice and warns that a path "can be interpreted in
        # multiple ways", both of them the same class.
        warnings.filterwarnings("ignore", "The specified dataset source can be interpreted", UserWarning)
        found = resolve_dataset_source(source)
    datasets = [MetaDataset(found, name=name, digest=digest, schema=schema) for digest in digests.values()]
    mlflow.log_inputs(datasets, contexts=list(digests), tags_list=[dict(tags) if tags else None] * len(datasets))


def log_missing_epochs(history: list[Mapping[str, Any]]) -> None:
    """Log the per-epoch metrics of ``history`` (dicts of EpochStats) the active run does not hold yet."""
    run_id = mlflow.active_run().info.run_id
    logged = {m.step for m in MlflowClient().get_metric_history(run_id, "val_loss")}
    logger = EpochLogger()
    for epoch in history:
        if epoch["epoch"] not in logged:
            logger.log_epoch(SimpleNamespace(**epoch))
    logger.wait()


# Each failed batch is logged there at ERROR with MLflow's whole request error; EpochLogger raises
# the same failure itself, once, where the stage reports it.
logging.getLogger("mlflow.utils.async_logging.async_logging_queue").setLevel(logging.CRITICAL)


class ShortRequestErrors(logging.Filter):
    """The system-metrics thread stops at its first failed request with a 300-character warning that
    repeats the URL; keep what happened and why."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if record.levelno >= logging.WARNING and "API request to" in text:
            reason = store.unreachable_reason(text, store.request_timeout())
            record.msg, record.args = (
                "system metrics: sampling stopped, the tracking server did not answer (%s)",
                (reason,),
            )
        return True


logging.getLogger("mlflow.system_metrics.system_metrics_monitor").addFilter(ShortRequestErrors())


class EpochLogger:
    """The train loop's reporter: per-epoch metrics with ``step=epoch``, logged asynchronously.

    Each epoch first waits for the previous epoch's batch: a failed one (the server went away) stops
    the training one epoch later instead of at its end, and the queue never holds more than an epoch.
    """

    def __init__(self) -> None:
        self._pending = None

    def wait(self) -> None:
        """Raise if the last batch failed (``MlflowException``); call it before the run ends."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.wait()

    def log_epoch(self, stats) -> None:
        signals.raise_if_stopped()
        self.wait()
        self._pending = mlflow.log_metrics(
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
