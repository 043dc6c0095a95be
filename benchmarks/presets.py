"""What the preset benchmarks share: a preset's runs in the MLflow store and their registered networks.
Apart from common.py, so that the speed benchmarks do not import MLflow."""

from __future__ import annotations

import mlflow
import torch
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient


def preset_runs(client: MlflowClient, experiment_name: str, preset: str) -> list[tuple[Run, ModelVersion | None]]:
    """The finished runs tagged ``preset=NAME``, by seed, each with its registered version (None where it
    has none of its own: evaluate never ran, or found the same weights already registered)."""
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise SystemExit(f"error: no MLflow experiment {experiment_name!r} in {mlflow.get_tracking_uri()}")
    runs = client.search_runs(
        [experiment.experiment_id], f"tags.preset = '{preset}' and attributes.status = 'FINISHED'"
    )
    runs = sorted(runs, key=lambda r: int(r.data.params.get("train.seed", -1)))
    return [(run, next(iter(client.search_model_versions(f"run_id = '{run.info.run_id}'")), None)) for run in runs]


def served_net(version: ModelVersion) -> torch.nn.Module:
    """The network inside a registered version's pyfunc (the one that is served), in eval mode."""
    model = mlflow.pyfunc.load_model(f"models:/{version.name}/{version.version}")
    return model.unwrap_python_model().classifier.net.eval()
