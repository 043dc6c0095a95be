"""What a training and its evaluation record in their MLflow run: tags, params, datasets, metrics,
figures and reports, and the registered model. The stages call these inside ``runs.run``/``runs.reopen``."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from mnist_cnn.core import figures, files
from mnist_cnn.core.data import load_split, md5sum, split_digests
from mnist_cnn.core.data_checks import DataReport
from mnist_cnn.core.files import Paths
from mnist_cnn.core.loop import TrainResult
from mnist_cnn.core.model_card import CardFacts, model_card
from mnist_cnn.core.params import ConfigError, Params, flatten, load_params
from mnist_cnn.core.selection import Scored
from mnist_cnn.tracking import pyfunc, registry, runmeta, runs, store

log = logging.getLogger(__name__)

TRAIN_SECTIONS = ("data", "model", "train")
EVALUATE_SECTIONS = ("evaluate",)
DATASET_SOURCE_ENV = "MNIST_MIRROR"
WEIGHTS_TAG = "weights_md5"  # one model version per trained weights


def section_params(params: Params, sections: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in flatten(params).items() if k.split(".")[0] in sections}


def run_name(stage: str, params: Params, paths: Paths) -> str:
    """``$DVC_EXP_NAME``, else the stage and the params that differ from the params file."""
    try:
        base = load_params(paths.params_file) if paths.params_file.is_file() else None
    except ConfigError:
        base = None
    return runmeta.run_name(stage, runmeta.changed_params(params, base))


def log_datasets(
    params: Params,
    paths: Paths,
    md5s: Mapping[str, str],
    contexts: tuple[str, ...],
    checks: DataReport | None = None,
) -> None:
    # The source is where the files came from when a mirror is named, else the directory read.
    source = os.environ.get(DATASET_SOURCE_ENV) or str(paths.data.resolve())
    digests = split_digests(md5s, params.train.val_split, params.data.split_seed)
    tags = None
    if checks is not None:  # the data checks' results, with the datasets they were made on
        tags = {"checks": "passed", **{key: str(value) for key, value in asdict(checks).items()}}
        tags["test_duplicates_dropped"] = str(params.data.drop_test_duplicates).lower()
    runs.log_datasets(params.data.dataset, source, {context: digests[context] for context in contexts}, tags)


def training_started(
    params: Params, paths: Paths, root: Path, md5s: Mapping[str, str], resumed: bool, checks: DataReport
) -> None:
    """Tags (dataset, preset, git lineage, data MD5s), the train stage's params and the params file, the
    data checks' numbers; the training and validation datasets (with the checks' results) unless the run
    is resumed (it logged them when it started)."""
    mlflow.set_tags(
        {
            "dataset": params.data.dataset,
            **({"preset": params.mlflow.preset} if params.mlflow.preset else {}),
            **runs.git_lineage(root),
            **{f"data_md5.{name}": md5 for name, md5 in md5s.items()},
        }
    )
    runs.log_params_once(
        {
            **section_params(params, TRAIN_SECTIONS),
            "mlflow.experiment": params.mlflow.experiment,
            "mlflow.preset": params.mlflow.preset,
        }
    )
    if paths.params_file.is_file():
        mlflow.log_artifact(str(paths.params_file))
    mlflow.log_metrics(checks.metrics())
    if not resumed:
        log_datasets(params, paths, md5s, ("training", "validation"), checks)


def training_resumed(history: list[Mapping[str, Any]], epoch: int) -> None:
    """Epochs logged before the interruption stay; those it did not get to log are added."""
    runs.log_missing_epochs(history)
    mlflow.set_tag("resumed_after_epoch", str(epoch))


def training_finished(result: TrainResult, world_size: int) -> None:
    runs.log_params_once({"device": result.device, "precision": result.precision, "world_size": world_size})
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
    runs.describe_active_run()


TRAINED_IN_TAG = "mnist_cnn.trained_in_run"


@contextlib.contextmanager
def pulled_weights_run(params: Params, paths: Paths, root: Path, trained_in: str, name: str) -> Iterator:
    """A new run for weights trained elsewhere (``trained_in``, a run of another store): the params they
    were trained with (params.yaml, which DVC keeps in step with the weights) and where they came from."""
    with runs.run(params.mlflow.experiment, root=root, name=name, tags={TRAINED_IN_TAG: trained_in}) as active:
        mlflow.set_tags({"dataset": params.data.dataset, **runs.git_lineage(root)})
        runs.log_params_once({**section_params(params, TRAIN_SECTIONS), "mlflow.experiment": params.mlflow.experiment})
        info = paths.root / files.TRAIN_INFO
        if info.is_file():
            mlflow.log_artifact(str(info))
        yield active


def evaluation_started(params: Params) -> None:
    runs.log_params_once(
        {**section_params(params, EVALUATE_SECTIONS), "mlflow.registered_model": params.mlflow.registered_model}
    )


def evaluation(
    params: Params,
    paths: Paths,
    metrics: Mapping[str, Mapping[str, float]],
    confusion: np.ndarray,
    report: str,
    md5s: Mapping[str, str],
    val_correct: np.ndarray,
) -> str:
    """The final metrics, the test dataset, figures and reports; then the model, registered once per
    weights. Returns the registered version."""
    final = {"test_loss": metrics["test"]["loss"], "test_acc": metrics["test"]["accuracy"]}
    for split in ("train", "val"):
        final[f"final_{split}_loss"] = metrics[split]["loss"]
        final[f"final_{split}_acc"] = metrics[split]["accuracy"]
    mlflow.log_metrics(final)
    log_datasets(params, paths, md5s, ("test",))
    runs.describe_active_run()
    fig = figures.confusion_matrix_figure(confusion)
    mlflow.log_figure(fig, "confusion_matrix.png")
    figures.close(fig)
    mlflow.log_dict(
        {
            "labels": list(range(len(confusion))),
            "counts": confusion.tolist(),
            "normalized": figures.normalise_rows(confusion).round(6).tolist(),
        },
        "confusion_matrix.json",
    )
    mlflow.log_text(report, "classification_report.txt")
    mlflow.log_artifact(str(paths.reports / files.CONFIDENT_MISTAKES.name))
    mlflow.log_dict(dict(metrics), "metrics.json")
    dvc_lock = paths.root / "dvc.lock"
    if dvc_lock.is_file():
        mlflow.log_artifact(str(dvc_lock))
    version = register_weights(params, paths, final["test_acc"], val_correct, md5s)
    write_model_card(params, version, metrics, confusion, md5s)
    return version


def write_model_card(
    params: Params,
    version: str,
    metrics: Mapping[str, Mapping[str, float]],
    confusion: np.ndarray,
    md5s: Mapping[str, str],
) -> None:
    """The version's model card: its description in the registry, and ``model_card.md`` in the run."""
    client = MlflowClient()
    model = params.mlflow.registered_model
    tags = client.get_model_version(model, version).tags
    run = client.get_run(mlflow.active_run().info.run_id)
    decision = tags.get(registry.DECISION_TAG)
    facts = CardFacts(
        model_name=model,
        version=version,
        run_id=run.info.run_id,
        dataset=params.data.dataset,
        data_md5s=md5s,
        params=section_params(params, TRAIN_SECTIONS),
        metrics=metrics,
        confusion=confusion,
        decision=f"{decision}: {tags[registry.REASON_TAG]}" if decision else "not decided by the rule",
        commit=run.data.tags.get("git_commit", "unknown"),
        dirty=run.data.tags.get("git_dirty", "unknown"),
    )
    card = model_card(facts)
    mlflow.log_text(card, "model_card.md")
    client.update_model_version(model, version, description=card)


def register_weights(
    params: Params, paths: Paths, test_acc: float, val_correct: np.ndarray, md5s: Mapping[str, str]
) -> str:
    """Log the pyfunc serving ``models/model.pt`` and register it, once per trained weights: evaluating the
    same weights again returns the version they already have. A new version is compared with the champion
    on the validation images (``val_correct``: which it got right), never on the test set."""
    weights = paths.models / files.WEIGHTS.name
    weights_md5 = md5sum(weights)
    model = params.mlflow.registered_model
    split = split_digests(md5s, params.train.val_split, params.data.split_seed)["validation"]
    existing = registry.version_with_tag(model, WEIGHTS_TAG, weights_md5)
    if existing is not None:
        log.info("%s v%s already holds these weights; not registered again", model, existing)
        client = MlflowClient()
        if registry.scored_version(client, model, existing) is None:  # registered before versions kept them
            registry.record_answers(client, model, Scored(existing, split, val_correct), test_acc)
            log.info("%s v%s: its validation answers recorded, so versions can be compared with it", model, existing)
        return existing
    example = load_split(paths.data, train=False).images[:5].numpy().astype(np.float32)
    info = pyfunc.log_model(weights, params.model, params.data.dataset, example, params.mlflow.registered_model)
    version = str(info.registered_model_version)
    MlflowClient().set_model_version_tag(params.mlflow.registered_model, version, WEIGHTS_TAG, weights_md5)
    challenger = Scored(version, split, val_correct)
    registry.promote_on_validation(model, challenger, test_acc, params.mlflow.promote_alpha)
    return version


STAGE_TAG, MODEL_URI_TAG = "mnist_cnn.stage", "mnist_cnn.model_uri"


def prediction_run(run_id: str, model_uri: str, rows: list[Mapping[str, Any]]) -> None:
    """The run ``mlflow run . -e predict`` made for this call: named ``predict``, with the model URI,
    how many files were predicted or refused, and every file's answer (``predictions.json``), so that
    it is never an empty run with a random name."""
    store.configure()
    runs.name_project_run(run_id, "predict")
    client = MlflowClient()
    # A tag, not a param: MLflow logged the entry point's own model_uri parameter, "" for the default.
    client.set_tag(run_id, STAGE_TAG, "predict")
    client.set_tag(run_id, MODEL_URI_TAG, model_uri)
    refused = sum("error" in row for row in rows)
    client.log_metric(run_id, "predicted_files", len(rows) - refused)
    client.log_metric(run_id, "refused_files", refused)
    client.log_dict(run_id, list(rows), "predictions.json")
