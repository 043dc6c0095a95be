"""The team's server for real: PostgreSQL and `mlflow server` (proxied artifacts, basic auth) on free
loopback ports in a tmp dir; the tiny pipeline run as a user; checked through MLflow's REST API."""

from __future__ import annotations

import psutil
import pytest
import requests

from conftest import assert_one_chain_of_champions, make_project, stage
from mnist_cnn.cli import main, server_main
from mnist_cnn.ops import server
from mnist_cnn.stages import evaluate, train
from team_helpers import USERS, new_server_config, running_team_server, skip_without_postgres


@pytest.fixture
def team_server(monkeypatch):
    skip_without_postgres()
    with running_team_server(new_server_config(monkeypatch)) as cfg:
        yield cfg


def api(cfg, method: str, endpoint: str, user: str | None, **kwargs) -> requests.Response:
    auth = (user, USERS[user]) if user else None
    return requests.request(method, f"{cfg.url}/api/2.0/mlflow/{endpoint}", auth=auth, timeout=30, **kwargs)


def as_user(monkeypatch, cfg, user: str, password: str | None = None) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", cfg.url)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password or USERS[user])


def test_pipeline_against_the_team_server_then_it_stops_cleanly(
    team_server, project, tiny_params, tiny_mirror, tmp_path, monkeypatch, capsys
):
    cfg = team_server
    assert api(cfg, "GET", "experiments/search", None, params={"max_results": 1}).status_code == 401

    # Listing runs (bob, first) never creates the experiment: the first to create it owns it.
    as_user(monkeypatch, cfg, "bob")
    assert main(["runs", "--clean", "--params", str(project.params_file), "--root", str(project.root)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"MLflow store: {cfg.url}"
    found = api(cfg, "GET", "experiments/get-by-name", "bob", params={"experiment_name": "mnist-cnn"})
    assert found.status_code == 404, found.text

    # A wrong password: one line naming the server and the refusal, before any training.
    as_user(monkeypatch, cfg, "alice", "not-her-password")
    code = main(["train", "--params", str(project.params_file), "--root", str(project.root)])
    assert code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: tracking server {cfg.url}: refused the login (HTTP 401); "
        "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
    )
    assert not (project.models / "model.pt").exists()

    as_user(monkeypatch, cfg, "alice")
    run_id, _ = train.run_train(tiny_params, project, show_progress=False)
    evaluate.run_evaluate(tiny_params, project)

    run = api(cfg, "GET", "runs/get", "alice", params={"run_id": run_id}).json()["run"]
    assert run["info"]["status"] == "FINISHED"
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert {"test_acc", "val_loss", "best_epoch"} <= set(metrics)
    # Artifacts went through the server (mlflow-artifacts:), and landed in its destination.
    assert run["info"]["artifact_uri"].startswith("mlflow-artifacts:")
    listed = api(cfg, "GET", "artifacts/list", "alice", params={"run_id": run_id}).json()["files"]
    assert "confusion_matrix.png" in {f["path"] for f in listed}
    stored = list((cfg.home / "artifacts").rglob("confusion_matrix.png"))
    assert len(stored) == 1 and run_id in str(stored[0])

    alias = api(cfg, "GET", "registered-models/alias", "alice", params={"name": "mnist-cnn", "alias": "champion"})
    assert alias.json()["model_version"]["version"] == "1"
    assert alias.json()["model_version"]["run_id"] == run_id

    # Bob may read alice's experiment (default permission READ) but not change it.
    experiment_id = run["info"]["experiment_id"]
    assert api(cfg, "GET", "experiments/get", "bob", params={"experiment_id": experiment_id}).status_code == 200
    tag = {"experiment_id": experiment_id, "key": "k", "value": "v"}
    assert api(cfg, "POST", "experiments/set-experiment-tag", "bob", json=tag).status_code == 403
    assert api(cfg, "POST", "experiments/set-experiment-tag", "alice", json=tag).status_code == 200

    # Bob's training is refused in one line naming the experiment, its creator and the command that
    # grants it; once the admin has granted it, bob may edit the experiment and the registered model.
    as_user(monkeypatch, cfg, "bob")
    assert main(["train", "--params", str(project.params_file), "--root", str(project.root)]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: tracking server {cfg.url}: bob may not log runs in experiment 'mnist-cnn' (created by alice)"
        " (HTTP 403); the server's admin can grant it: python -m mnist_cnn server grant bob"
    )
    model_tag = {"name": "mnist-cnn", "key": "k", "value": "v"}
    assert api(cfg, "POST", "registered-models/set-tag", "bob", json=model_tag).status_code == 403
    assert server_main(["grant", "bob", "--home", str(cfg.home)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "bob may now edit experiment 'mnist-cnn'",
        "bob may now edit registered model 'mnist-cnn'",
    ]
    assert api(cfg, "POST", "experiments/set-experiment-tag", "bob", json=tag).status_code == 200
    assert api(cfg, "POST", "registered-models/set-tag", "bob", json=model_tag).status_code == 200
    as_user(monkeypatch, cfg, "alice")

    # Three more at once, each in a clone of its own (as three teammates would), against the server:
    # three more versions, each compared with the champion of its moment (the alias moves under the
    # server-wide registry lock). (DVC's queue, which runs experiments the same way, is tested on SQLite.)
    clones = [make_project(tmp_path / f"clone-{seed}", tiny_mirror, **{"train.seed": seed}) for seed in (2, 3, 4)]
    procs = [stage(clone, "all") for clone in clones]  # not seed 1: the same weights would be no new version
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0], "\n".join(outputs)
    found = api(cfg, "POST", "runs/search", "alice", json={"experiment_ids": [experiment_id]}).json()["runs"]
    assert len(found) == 4 and {r["info"]["status"] for r in found} == {"FINISHED"}
    accuracy = {r["info"]["run_id"]: {m["key"]: m["value"] for m in r["data"]["metrics"]}["test_acc"] for r in found}
    versions = api(cfg, "GET", "model-versions/search", "alice", params={"filter": "name='mnist-cnn'"}).json()
    assert len(versions["model_versions"]) == 4
    champion = api(cfg, "GET", "registered-models/alias", "alice", params={"name": "mnist-cnn", "alias": "champion"})
    tags = {v["version"]: {t["key"]: t["value"] for t in v["tags"]} for v in versions["model_versions"]}
    assert_one_chain_of_champions(tags, champion.json()["model_version"]["version"])
    assert all(
        float(tags[v]["test_acc"]) == accuracy[r]
        for v, r in ((v["version"], v["run_id"]) for v in versions["model_versions"])
    )
    lock = api(cfg, "GET", "registered-models/get", "alice", params={"name": "mnist-cnn.promotion-lock"})
    assert lock.status_code == 404  # released

    # The server (after all that) stops cleanly and leaves nothing running.
    pids = [
        server.read_state(cfg.home)["pid"],
        int((cfg.pgdata / "postmaster.pid").read_text().split()[0]),
    ]
    status = server.status(cfg)
    assert status["postgresql"].startswith("running") and status["mlflow server"].startswith("running")
    assert server.start(cfg) == cfg.url  # starting again is harmless
    server.stop(cfg)
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids)
    assert server.status(cfg) == {"postgresql": "stopped", "mlflow server": "stopped"}
