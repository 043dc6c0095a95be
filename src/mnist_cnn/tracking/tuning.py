"""What a tune study records in MLflow: one parent run per study, shared by all its workers, and one child
run per trial nested under it; the parent holds the study's settings, the best trial so far, the best
params and the study's plots.

MLflow only: the tune stage keeps the Optuna study and hands plain values (and figures) to these.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from mnist_cnn.core import figures
from mnist_cnn.core.errors import masked
from mnist_cnn.core.files import is_url
from mnist_cnn.core.loop import EpochStats
from mnist_cnn.core.search import TuneConfig
from mnist_cnn.tracking import owners, runs, store

STATE_TAG = "optuna.state"  # complete | pruned | fail, on every child run


LAUNCHER_PARENT_TAG = "mnist_cnn.tune_parent"  # on a later worker's `mlflow run` run: the study's parent


def _run_tags(tags: Mapping[str, Any]) -> list[RunTag]:
    return [RunTag(k, str(v)) for k, v in tags.items()]


def parent_run_params(cfg: TuneConfig) -> dict[str, str]:
    """The study's settings as the parent run's params: ``tune.*``, the storage without its password,
    and each searched key's range or choices."""
    values = {f"tune.{k}": v for k, v in vars(cfg).items() if k != "space"}
    values["tune.storage"] = masked(cfg.storage) if is_url(cfg.storage) else cfg.storage
    for p in cfg.space:
        how = f"choices {list(p.choices)}" if p.choices else f"[{p.low}, {p.high}]{' log' if p.log else ''}"
        values[f"tune.space.{p.key}"] = how
    return {k: str(v) for k, v in values.items()}


def create_parent_run(cfg: TuneConfig, exp_id: str, root: Path, launcher: str | None = None) -> str:
    """A new parent run for the study, owned by this worker, with the study's settings as params; its id.
    ``launcher``: the run ``mlflow run`` made for this worker, which becomes the parent if it exists."""
    client = MlflowClient()
    tags = {
        **owners.owner_tags(),
        **runs.git_lineage(root),
        "optuna.study_name": cfg.study_name,
        "mnist_cnn.stage": "tune",
    }
    if launcher and runs.run_exists(launcher, root):
        parent = launcher
        client.update_run(parent, name=cfg.study_name)
        client.log_batch(parent, tags=_run_tags(tags))
    else:
        parent = client.create_run(exp_id, run_name=cfg.study_name, tags=tags).info.run_id
    client.log_batch(parent, params=[Param(k, v) for k, v in parent_run_params(cfg).items()])
    return parent


def claim_parent_run(parent: str) -> None:
    """The parent is RUNNING while any worker works, owned by a live one: reopen it if a worker that
    thought it was the last ended it, or if its owner is gone."""
    client = MlflowClient()
    run = client.get_run(parent)
    if run.info.status != "RUNNING" or owners.run_is_stale(run.data.tags, store.is_local_store()):
        client.update_run(parent, status="RUNNING")
        client.log_batch(parent, tags=_run_tags(owners.owner_tags()))


def join_parent_run(parent: str, launcher: str | None = None) -> None:
    """A later worker joins the study's ``parent``: claims it, and points the run ``mlflow run`` made for
    this worker (``launcher``) at it."""
    claim_parent_run(parent)
    if launcher and launcher != parent:
        MlflowClient().set_tag(launcher, LAUNCHER_PARENT_TAG, parent)


@contextlib.contextmanager
def trial_run(
    experiment: str, root: Path, parent: str, study_name: str, trial_number: int, pruned: type[BaseException]
) -> Iterator[str]:
    """The trial's child run under ``parent``, active inside the block; yields its id. It ends FINISHED,
    KILLED when the block raises ``pruned`` (the trial was pruned), FAILED on any other error."""
    tags = {"optuna.study_name": study_name, "optuna.trial_number": str(trial_number)}
    with runs.run(
        experiment,
        root=root,
        parent_run_id=parent,
        name=f"trial-{trial_number}",
        tags=tags,
        ended_as={pruned: "KILLED"},
    ) as active:
        yield active.info.run_id


def log_trial_params(values: Mapping[str, Any]) -> None:
    """The trial's settings into its (active) child run."""
    mlflow.log_params(values, synchronous=True)


@contextlib.contextmanager
def trial_state_tagged(pruned: type[BaseException]) -> Iterator[None]:
    """Tag the active child run with how the block ended: ``complete``, ``pruned`` (it raised ``pruned``)
    or ``fail``."""
    state = "fail"
    try:
        yield
        state = "complete"
    except pruned:
        state = "pruned"
        raise
    finally:
        mlflow.set_tag(STATE_TAG, state)


def log_trial_epoch(stats: EpochStats) -> None:
    """One epoch's metrics into the active child run, ``step`` the epoch."""
    # Synchronous: a trial's run is short, and MLflow's async queue costs about a second per run to shut down.
    mlflow.log_metrics({k: v for k, v in vars(stats).items() if k != "epoch"}, step=stats.epoch, synchronous=True)


def log_trial_result(best_val_loss: float, best_epoch: int) -> None:
    """What the trial kept, into its active child run."""
    mlflow.log_metrics({"best_val_loss": best_val_loss, "best_epoch": best_epoch})


def log_study_summary(parent: str, metrics: Mapping[str, float], tags: Mapping[str, Any]) -> None:
    """The study so far into the parent run, in one request: ``metrics`` at step 0, ``tags`` as text."""
    now = int(time.time() * 1000)
    MlflowClient().log_batch(
        parent,
        metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
        tags=_run_tags(tags),
    )


def hand_parent_run_to(parent: str, owner: Mapping[str, str]) -> None:
    """Make ``owner`` (a worker still working, ``owners.owner_tags()``) the parent's owner: a parent owned
    by a worker that left would look stale."""
    MlflowClient().log_batch(parent, tags=_run_tags(owner))


def log_parent_text(parent: str, text: str, artifact_file: str) -> None:
    MlflowClient().log_text(parent, text, artifact_file)


def log_parent_figure(parent: str, figure: Any, artifact_file: str) -> None:
    """A matplotlib figure into the parent run as ``artifact_file``; the figure is closed after."""
    try:
        MlflowClient().log_figure(parent, figure, artifact_file)
    finally:
        figures.close(figure)


def end_parent_run(parent: str, status: str) -> None:
    """End the parent run ``FINISHED``, ``FAILED`` or ``KILLED``."""
    MlflowClient().set_terminated(parent, status)
