"""A tracking server killed for real while a training logs to it (its whole process group, SIGKILL):
one line, a prompt stop, the checkpoint kept, and a rerun against a restarted server that resumes
and closes the same run."""

from __future__ import annotations

import os
import signal

from mlflow.tracking import MlflowClient

from conftest import EPOCH_LINE, ended_after_fault, stage, the_error_line, wait_for_line, write_tiny_params
from mnist_cnn.tracking import store
from ui_driver import mlflow_server


def test_a_tracking_server_killed_mid_training_stops_it_in_one_line_and_the_rerun_resumes_the_same_run(
    project, tmp_path, monkeypatch
):
    write_tiny_params(project.params_file, **{"train.epochs": 10, "train.patience": 10})
    backend = store.tracking_uri()  # the test's SQLite store, behind the server
    with mlflow_server(backend, tmp_path / "first.log") as url:
        training = stage(project, "train", env={"MLFLOW_TRACKING_URI": url})
        before = wait_for_line(training, EPOCH_LINE.format(epoch=2))
        server_group = _listener_group(url)
        # uvicorn's worker too: nothing answers any more
        output, stopped_s = ended_after_fault(training, before, lambda: os.killpg(server_group, signal.SIGKILL), 120)

    error = the_error_line(training, output)
    assert f"tracking server {url} stopped answering during run " in error, error
    assert "(connection refused)" in error and "training resumes from models/checkpoint.pt" in error
    for noise in ("Traceback", "Retrying", "async_logging_queue", "Max retries exceeded"):
        assert noise not in output, output
    assert max(len(line) for line in output.splitlines()) < len(error) + 1, output
    assert stopped_s < 60, f"{stopped_s:.0f} s after the kill"
    run_id = error.split("during run ")[1].split()[0]
    assert (project.models / "checkpoint.pt").is_file() and not (project.models / "model.pt").exists()

    client = MlflowClient(backend)  # straight to the store: the run was left as the server last had it
    assert client.get_run(run_id).info.status == "RUNNING"

    # The rerun once a server answers again (artifacts go through one: the experiment's are proxied).
    with mlflow_server(backend, tmp_path / "second.log") as url:
        rerun = stage(project, "train", env={"MLFLOW_TRACKING_URI": url})
        output, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, output
    assert "resuming after epoch" in output
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_id, "val_loss")]
    assert steps == list(range(1, int(run.data.metrics["stopped_epoch"]) + 1)), steps
    assert len(client.search_runs([run.info.experiment_id])) == 1


def _listener_group(url: str) -> int:
    """The process group of whatever listens on the server's port: proven ours, the server we started."""
    import psutil

    port = int(url.rsplit(":", 1)[1])
    for conn in psutil.net_connections("tcp"):
        if conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
            group = os.getpgid(conn.pid)
            leader = psutil.Process(group).cmdline()  # `mnist-cnn ui` execs `mlflow ui` with our port
            assert leader[1:3] == ["-m", "mlflow"] and str(port) in leader, f"not our server: {leader}"
            return group
    raise AssertionError(f"nothing listens on {url}")
