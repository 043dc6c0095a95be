"""The stages as the pipeline runs them: each training is one MLflow run, shared by train and evaluate.

``dvc.yaml`` (through the CLI), ``MLproject`` and the tests all call these functions.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from . import distributed, figures, layout, runmeta, served, tracking
from .config import ConfigError, Params, flatten, load_params
from .data import DataError, load_split, md5sum, split_digests, verified_md5s
from .distributed import World
from .evaluate import EvaluateResult, evaluate
from .train import Checkpointing, TrainResult, load_checkpoint, train, training_fingerprint, write_train_info

log = logging.getLogger(__name__)

TRAIN_SECTIONS = ("data", "model", "train")
EVALUATE_SECTIONS = ("evaluate",)


@dataclass(frozen=True)
class Paths:
    """Where the stages read and write; defaults are the project layout, tests point them at tmp dirs."""

    root: Path = Path(".")
    params_file: Path = layout.PARAMS

    @property
    def data(self) -> Path:
        return self.root / layout.DATA_DIR

    @property
    def models(self) -> Path:
        return self.root / layout.MODEL_DIR

    @property
    def reports(self) -> Path:
        return self.root / layout.REPORTS_DIR


def _section_params(params: Params, sections: tuple[str, ...]) -> dict:
    return {k: v for k, v in flatten(params).items() if k.split(".")[0] in sections}


def _run_name(stage: str, params: Params, paths: Paths) -> str:
    """``$DVC_EXP_NAME``, else the stage and the params that differ from the params file."""
    try:
        base = load_params(paths.params_file) if paths.params_file.is_file() else None
    except ConfigError:
        base = None
    return runmeta.run_name(stage, runmeta.changed_params(params, base))


DATASET_SOURCE_ENV = "MNIST_MIRROR"


def _log_datasets(params: Params, paths: Paths, md5s: dict[str, str], contexts: tuple[str, ...]) -> None:
    # The source is where the files came from when a mirror is named, else the directory read.
    source = os.environ.get(DATASET_SOURCE_ENV) or str(paths.data.resolve())
    digests = split_digests(md5s, params.train.val_split, params.train.seed)
    tracking.log_datasets(params.data.dataset, source, {context: digests[context] for context in contexts})


def run_train(
    params: Params,
    paths: Paths,
    show_progress: bool | None = None,
    stage: str = "train",
    world: World | None = None,
) -> tuple[str | None, TrainResult]:
    """Train inside a new MLflow run (or the one ``mlflow run`` made); return (run id, result).

    The run is named after ``stage`` (``train`` or ``all``) and what differs from the params file,
    samples system metrics while it trains, and gets a description evaluate completes later.
    With ``train.resume: auto``, a checkpoint of this same training (left by a killed or crashed
    run) is continued, in the MLflow run it was started in. Under torchrun only rank 0 tracks and
    writes; the other ranks train their shards and return (None, result).
    """
    world = world or distributed.from_env()
    root = tracking.project_root(paths.root.resolve())
    md5s = verified_md5s(paths.data, params.data.dataset)
    fingerprint = training_fingerprint(params, md5s, world.size)
    checkpoint_path = paths.models / layout.CHECKPOINT.name
    if not world.is_main:  # rank 0 alone holds the lock and reads the checkpoint; fit hands it on
        checkpointing = Checkpointing(checkpoint_path, fingerprint)
        return None, train(params, paths.data, paths.models, paths.reports, None, False, checkpointing, world)
    state = load_checkpoint(checkpoint_path, fingerprint) if params.train.resume == "auto" else None
    resumed_run = state["run_id"] if state is not None and tracking.run_exists(state["run_id"], root) else None
    name = _run_name(stage, params, paths)
    with tracking.run(
        params.mlflow.experiment, run_id=resumed_run, root=root, name=name, system_metrics=True
    ) as active:
        run_id = active.info.run_id
        mlflow.set_tags(
            {
                "dataset": params.data.dataset,
                **({"preset": params.mlflow.preset} if params.mlflow.preset else {}),
                **tracking.git_lineage(root),
                **{f"data_md5.{name}": md5 for name, md5 in md5s.items()},
            }
        )
        tracking.log_params_once(
            {
                **_section_params(params, TRAIN_SECTIONS),
                "mlflow.experiment": params.mlflow.experiment,
                "mlflow.preset": params.mlflow.preset,
            }
        )
        if paths.params_file.is_file():
            mlflow.log_artifact(str(paths.params_file))
        if resumed_run is None:  # a resumed run logged them when it started
            _log_datasets(params, paths, md5s, ("training", "validation"))
        if state is not None:
            # Epochs logged before the interruption stay; those it did not get to log are added.
            tracking.log_missing_epochs(state["history"])
            mlflow.set_tag("resumed_after_epoch", str(state["epoch"]))
        checkpointing = Checkpointing(checkpoint_path, fingerprint, run_id, state)
        # The old train.json names the run of the weights about to be replaced: a kill after the new
        # weights are written must not let evaluate file them under that run.
        (paths.models / layout.TRAIN_INFO.name).unlink(missing_ok=True)
        result = train(
            params, paths.data, paths.models, paths.reports, tracking.EpochLogger(), show_progress, checkpointing, world
        )
        tracking.log_params_once({"device": result.device, "precision": result.precision, "world_size": world.size})
        mlflow.log_metrics(
            {
                "best_epoch": result.best_epoch,
                "stopped_epoch": result.stopped_epoch,
                "best_val_loss": result.best_val_loss,
                "best_val_acc": result.best_val_acc,
                "train_seconds": result.train_seconds,
            }
        )
        fig = figures.learning_curves(result.history)
        mlflow.log_figure(fig, "learning_curves.png")
        figures.close(fig)
        tracking.describe_active_run()
        write_train_info(result, paths.models, run_id, params.train)
        # Last: a kill before this line leaves the checkpoint, and the rerun records what is missing.
        checkpoint_path.unlink(missing_ok=True)
    return run_id, result


def _read_train_info(paths: Paths, params: Params) -> str:
    """The training's MLflow run id, after checking that evaluate uses the split the weights trained on."""
    info_path = paths.models / layout.TRAIN_INFO.name
    try:
        info = json.loads(info_path.read_text())
        run_id = info["run_id"]
        if not isinstance(run_id, str) or not run_id:
            raise TypeError(run_id)
    except FileNotFoundError:
        raise DataError(f"{info_path}: not found (run the train stage first)") from None
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise DataError(f"{info_path}: expected JSON with a run_id (rerun the train stage)") from None
    for key in ("val_split", "seed"):
        trained, now = info.get(key), getattr(params.train, key)
        if trained is not None and trained != now:
            raise DataError(
                f"train.{key} = {now!r}, but the weights were trained with {trained!r} ({info_path}): the "
                "validation set would overlap the training data; rerun the train stage or restore the value"
            )
    return run_id


WEIGHTS_TAG = "weights_md5"


def _log_model(params: Params, paths: Paths, test_acc: float) -> str:
    """Log the pyfunc serving ``models/model.pt`` and register it, once per trained weights: evaluating the
    same weights again returns the version they already have."""
    weights = paths.models / layout.WEIGHTS.name
    weights_md5 = md5sum(weights)
    existing = tracking.version_with_tag(params.mlflow.registered_model, WEIGHTS_TAG, weights_md5)
    if existing is not None:
        log.info("%s v%s already holds these weights; not registered again", params.mlflow.registered_model, existing)
        return existing
    example = load_split(paths.data, train=False).images[:5].numpy().astype(np.float32)
    info = served.log_model(weights, params.model, params.data.dataset, example, params.mlflow.registered_model)
    version = str(info.registered_model_version)
    MlflowClient().set_model_version_tag(params.mlflow.registered_model, version, WEIGHTS_TAG, weights_md5)
    tracking.promote_if_better(params.mlflow.registered_model, version, test_acc)
    return version


def run_evaluate(params: Params, paths: Paths) -> tuple[str, EvaluateResult]:
    """Evaluate into the run the train stage made; log the metrics, figures and the model.

    The run's status stays the training's; evaluate's own outcome is the tag ``evaluate.status``.
    """
    root = tracking.project_root(paths.root.resolve())
    run_id = _read_train_info(paths, params)
    with tracking.reopen(run_id, "evaluate", root=root, name=_run_name("evaluate", params, paths)) as active:
        tracking.log_params_once(
            {
                **_section_params(params, EVALUATE_SECTIONS),
                "mlflow.registered_model": params.mlflow.registered_model,
            }
        )
        _, result = evaluate(params, paths.data, paths.models, paths.reports)
        final = {"test_loss": result.metrics["test"]["loss"], "test_acc": result.metrics["test"]["accuracy"]}
        for split in ("train", "val"):
            final[f"final_{split}_loss"] = result.metrics[split]["loss"]
            final[f"final_{split}_acc"] = result.metrics[split]["accuracy"]
        mlflow.log_metrics(final)
        _log_datasets(params, paths, result.data_md5s, ("test",))
        tracking.describe_active_run()
        fig = figures.confusion_matrix_figure(result.confusion)
        mlflow.log_figure(fig, "confusion_matrix.png")
        figures.close(fig)
        mlflow.log_dict(
            {
                "labels": list(range(len(result.confusion))),
                "counts": result.confusion.tolist(),
                "normalized": figures.normalise_rows(result.confusion).round(6).tolist(),
            },
            "confusion_matrix.json",
        )
        mlflow.log_text(result.report, "classification_report.txt")
        mlflow.log_artifact(str(paths.reports / layout.CONFIDENT_MISTAKES.name))
        mlflow.log_dict(result.metrics, "metrics.json")
        dvc_lock = paths.root / "dvc.lock"
        if dvc_lock.is_file():
            mlflow.log_artifact(str(dvc_lock))
        _log_model(params, paths, final["test_acc"])
        run_id = active.info.run_id
    return run_id, result
