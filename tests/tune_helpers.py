"""The tune tests' tiny study: its params, and what a finished study and its MLflow runs must look like."""

from __future__ import annotations

from pathlib import Path

import mlflow
import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from conftest import write_tiny_params
from mnist_cnn.core.params import parse_params
from mnist_cnn.stages.tune import PARENT_ATTR, RUN_ATTR
from mnist_cnn.tracking import store

# lr 1e-5 learns nothing in an epoch: once a trial with lr 1.0 has finished, the median pruner stops
# every 1e-5 trial after its first epoch.
TINY_SPACE = {
    "train.lr": {"choices": [1.0, 0.00001]},
    "model.hidden_3": {"low": 16, "high": 32, "log": True},
}


TINY_TUNE = {
    "n_trials": 4,
    "epochs": 2,
    "pruner": {"name": "median", "startup_trials": 1, "warmup_epochs": 0},
    "space": TINY_SPACE,
}


def write_tune_params(path: Path, **tune) -> Path:
    write_tiny_params(path, **{"model.hidden_1": 8, "model.hidden_2": 8})
    raw = yaml.safe_load(path.read_text())
    raw["tune"].update({**TINY_TUNE, **tune})
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def journal(root: Path, name: str = "mnist-cnn") -> optuna.Study:
    backend = optuna.storages.journal.JournalFileBackend(str(root / "tune" / "study.journal"))
    return optuna.load_study(study_name=name, storage=optuna.storages.JournalStorage(backend))


def tune_runs(root: Path) -> tuple[list, list]:
    """(parents, children) of the experiment mnist-cnn."""
    store.configure(root)
    experiment = mlflow.get_experiment_by_name("mnist-cnn")
    runs = MlflowClient().search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return parents, [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def check_study_and_runs(root: Path, n_trials: int, epochs: int) -> tuple[optuna.Study, object]:
    """Every trial once and finished, one child run each under the one FINISHED parent, best params file."""
    study = journal(root)
    trials = study.get_trials()
    assert sorted(t.number for t in trials) == list(range(n_trials))
    assert {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    parents, children = tune_runs(root)
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED" and study.user_attrs[PARENT_ATTR] == parent.info.run_id
    assert sorted(int(c.data.tags["optuna.trial_number"]) for c in children) == list(range(n_trials))
    client = MlflowClient()
    for trial in trials:
        (child,) = [c for c in children if c.data.tags["optuna.trial_number"] == str(trial.number)]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert trial.user_attrs[RUN_ATTR] == child.info.run_id
        assert {k: float(child.data.params[k]) for k in trial.params} == pytest.approx(trial.params)
        assert child.data.params["train.epochs"] == str(epochs)
        assert child.data.params["train.monitor"] == "val_loss"  # the study's value is the loss it kept
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_loss")]
        if trial.state == TrialState.COMPLETE:
            assert (child.info.status, child.data.tags["optuna.state"]) == ("FINISHED", "complete")
            assert steps == list(range(1, epochs + 1))
        else:
            assert (child.info.status, child.data.tags["optuna.state"]) == ("KILLED", "pruned")
            assert steps == sorted(trial.intermediate_values) and len(steps) < epochs

    best = study.best_trial
    assert parent.data.metrics["best_value"] == pytest.approx(best.value)
    assert parent.data.tags["best.trial"] == str(best.number)
    assert {k: parent.data.tags[f"best.{k}"] for k in best.params} == {k: str(v) for k, v in best.params.items()}
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"optimization_history.png", "param_importances.png", "best_params.yaml"} <= artifacts

    written = yaml.safe_load((root / "reports" / "best_params.yaml").read_text())
    assert {f"{s}.{k}": v for s, values in written.items() for k, v in values.items()} == best.params
    assert not list((root / "reports").glob(".*.tmp"))
    # A copy into params.yaml gives valid params with those values.
    raw = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in written.items():
        raw[section].update(values)
    applied = parse_params(raw)
    assert applied.train.lr == best.params["train.lr"] and applied.model.hidden_3 == best.params["model.hidden_3"]
    return study, parent
