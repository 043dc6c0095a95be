"""The real DVC CLI on the tiny data, inside a temporary git repo: repro, no-op repro, `exp run -S`, a
queue of three experiments on SQLite, push to a remote and pull into a fresh clone."""

import json
import os
import sys
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from conftest import TINY_WIDTHS, assert_one_chain_of_champions, dvc, git, run_queue, sh


def ran_stages(output: str) -> list[str]:
    return [stage for stage in ("download", "train", "evaluate") if f"Running stage '{stage}'" in output]


def runs_in(repo: Path):
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    mlflow.set_registry_uri(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = mlflow.get_experiment_by_name("mnist-cnn")
    return MlflowClient().search_runs([experiment.experiment_id], order_by=["start_time ASC"])


def test_repro_then_noop_then_param_change_reruns_only_train_and_evaluate(reproduced_template, reproduced_repo):
    """The first ``dvc repro`` is the session's (tests/conftest.py: reproduced_template, its output kept,
    the result committed); the rest runs in this test's copy of that repo."""
    dvc_repo = reproduced_repo
    first = reproduced_template.output
    assert ran_stages(first) == ["download", "train", "evaluate"]
    metrics = json.loads((dvc_repo / "reports" / "metrics.json").read_text())
    assert set(metrics) == {"train", "val", "test"} and metrics["test"]["accuracy"] > 50

    shown = json.loads(dvc("metrics", "show", "--json", cwd=dvc_repo))
    workspace = next(iter(shown.values()))["data"]["reports/metrics.json"]["data"]
    assert workspace == metrics
    plots = json.loads(dvc("plots", "show", "--json", "--split", cwd=dvc_repo))
    assert {"Loss", "Accuracy", "Confusion matrix", "reports/confident_mistakes.png"} <= set(plots["data"])

    runs = runs_in(dvc_repo)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    # DVC sets DVC_ROOT and DVC_STAGE for a stage's command: nothing differs from params.yaml.
    assert runs[0].info.run_name == "train" and runs[0].data.tags["launched_by"] == "dvc repro"
    assert "test_acc" in runs[0].data.metrics
    train_info = json.loads((dvc_repo / "models" / "train.json").read_text())
    assert train_info["run_id"] == runs[0].info.run_id

    second = dvc("repro", cwd=dvc_repo)
    assert ran_stages(second) == []
    assert len(runs_in(dvc_repo)) == 1

    # The first run is committed (the template did it).
    tiny = [arg for key, value in TINY_WIDTHS.items() for arg in ("-S", f"{key}={value}")]  # no accuracy asserted
    experiment = dvc("exp", "run", "-S", "train.lr=0.2", *tiny, cwd=dvc_repo)
    assert ran_stages(experiment) == ["train", "evaluate"]
    runs = runs_in(dvc_repo)
    assert len(runs) == 2
    assert runs[1].data.params["train.lr"] == "0.2"
    # `dvc exp run` adds DVC_EXP_NAME: the run is called as `dvc exp list` names the experiment.
    assert runs[1].data.tags["launched_by"] == "dvc exp run"
    assert dvc("exp", "list", "--name-only", cwd=dvc_repo).split() == [runs[1].info.run_name]
    assert all(run.info.status == "FINISHED" for run in runs)
    versions = MlflowClient().search_model_versions("name='mnist-cnn'")
    assert len(versions) == 2


def test_queue_of_three_experiments_two_at_a_time_on_sqlite(reproduced_repo):
    """Three queued experiments, two workers: two run at once, the third waits for a free worker."""
    dvc_repo = reproduced_repo  # the baseline reproduced and committed
    rates = ["0.1", "0.2", "0.5"]
    tiny = [arg for key, value in TINY_WIDTHS.items() for arg in ("-S", f"{key}={value}")]  # no accuracy asserted
    for lr in rates:
        dvc("exp", "run", "--queue", "-S", f"train.lr={lr}", *tiny, cwd=dvc_repo)
    status = run_queue(dvc_repo)
    assert status.count("Success") == 3, status

    runs = runs_in(dvc_repo)[1:]  # after the baseline's
    assert len(runs) == 3 and {run.info.status for run in runs} == {"FINISHED"}
    assert sorted(run.data.params["train.lr"] for run in runs) == rates
    # Each run is named after its DVC experiment, as `dvc queue status` lists them.
    assert all(run.info.run_name and run.info.run_name in status for run in runs), status
    client = MlflowClient()
    assert all(len(client.get_metric_history(run.info.run_id, "val_loss")) == 2 for run in runs)
    versions = client.search_model_versions("name = 'mnist-cnn'")
    assert len(versions) == 4
    champion = client.get_model_version_by_alias("mnist-cnn", "champion")
    assert_one_chain_of_champions({str(v.version): v.tags for v in versions}, str(champion.version))


def test_remote_push_then_fresh_clone_pulls_everything_and_needs_no_training(reproduced_repo, tmp_path):
    dvc_repo = reproduced_repo  # reproduced and committed
    remote = tmp_path / "remote"
    dvc("remote", "add", "-d", "shared", str(remote), cwd=dvc_repo)
    dvc("push", cwd=dvc_repo)
    git("add", "-A", cwd=dvc_repo)
    git("commit", "-qm", "trained", cwd=dvc_repo)

    clone = tmp_path / "clone"
    git("clone", "-q", str(dvc_repo), str(clone), cwd=tmp_path)
    assert not (clone / "models" / "model.pt").exists()
    dvc("pull", cwd=clone)
    for path in ("data/raw", "models/model.pt", "models/train.json", "reports/predictions.csv"):
        assert (clone / path).exists(), path
    assert "Data and pipelines are up to date" in dvc("status", cwd=clone)
    assert ran_stages(dvc("repro", cwd=clone)) == []

    # The teammate evaluates the pulled weights against the team's store (here: A's SQLite file,
    # as a tracking server would be): the same run, and no second model version for the same weights.
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{dvc_repo / 'mlflow.db'}"}
    sh([sys.executable, "-m", "mnist_cnn", "evaluate"], clone, env)
    (run,) = runs_in(dvc_repo)
    assert run.data.tags["evaluate.status"] == "FINISHED" and run.info.status == "FINISHED"
    assert len(MlflowClient().search_model_versions("name = 'mnist-cnn'")) == 1

    # With only the clone's own store, the pulled weights are no dead end: a new run says where they
    # came from, and registers them there (champion, so they can be served).
    alone = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    output = sh([sys.executable, "-m", "mnist_cnn", "evaluate"], clone, alone)
    assert f"run {run.info.run_id} (models/train.json) is not in the store sqlite:///{clone / 'mlflow.db'}" in output
    (own,) = runs_in(clone)
    assert own.info.status == "FINISHED" and own.data.tags["mnist_cnn.trained_in_run"] == run.info.run_id
    assert own.data.params["train.lr"] == run.data.params["train.lr"] and "test_acc" in own.data.metrics
    champion = MlflowClient().get_model_version_by_alias("mnist-cnn", "champion")
    assert champion.run_id == own.info.run_id
