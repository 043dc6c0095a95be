"""Faults made for real: parallel starts on a new store, signals, SIGKILL and resume, a dead or refusing
tracking server, a full or read-only disk, corrupt weights, changed data, file modes."""

from __future__ import annotations

import dataclasses
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import stage, the_runs, wait_for_line, write_tiny_params
from mnist_cnn.cli import main
from mnist_cnn.core.checkpoint import fingerprint_difference, training_fingerprint
from mnist_cnn.core.params import load_params
from mnist_cnn.stages import evaluate, train
from mnist_cnn.tracking import owners
from mnist_cnn.tracking.store import TrackingError, check_server, configure, experiment_id

EPOCH_LINE = "epoch {epoch:>3}/"


def error_line(stderr: str) -> str:
    """The one ``error:`` line of a stage's stderr (MLflow's own INFO lines may come before it)."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# 1. Parallel runs on a new store
def test_four_trainings_at_once_on_a_new_store_all_finish(tmp_path, tiny_mirror):
    store = tmp_path / "fresh" / "mlflow.db"
    assert not store.exists()
    procs = []
    for seed in range(4):
        root = tmp_path / f"p{seed}"
        shutil.copytree(tiny_mirror, root / "data" / "raw")
        write_tiny_params(root / "params.yaml", **{"train.epochs": 1, "train.seed": seed})
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "mnist_cnn", "all", "--no-progress"],
                cwd=root,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}"},
            )
        )
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    for proc, output in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, output
    mlflow.set_tracking_uri(f"sqlite:///{store}")
    mlflow.set_registry_uri(f"sqlite:///{store}")
    client = MlflowClient()
    found = client.search_runs([mlflow.get_experiment_by_name("mnist-cnn").experiment_id])
    assert len(found) == 4 and {run.info.status for run in found} == {"FINISHED"}
    assert all(len(client.get_metric_history(run.info.run_id, "val_loss")) == 1 for run in found)
    versions = client.search_model_versions("name = 'mnist-cnn'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3, 4]
    best = max(found, key=lambda run: run.data.metrics["test_acc"])
    champion = client.get_model_version_by_alias("mnist-cnn", "champion")
    assert client.get_run(champion.run_id).data.metrics["test_acc"] == best.data.metrics["test_acc"]


# 2. Signals during clean-up; SIGKILL; stale runs
def test_repeated_interrupts_while_ending_still_end_the_run_killed(project):
    write_tiny_params(project.params_file, **{"train.epochs": 500, "train.patience": 500})
    proc = stage(project, "train")
    wait_for_line(proc, EPOCH_LINE.format(epoch=1))
    proc.send_signal(signal.SIGINT)
    for _ in range(40):  # keep interrupting through the whole clean-up
        time.sleep(0.05)
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGINT if _ % 2 else signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert [run.info.status for run in the_runs()] == ["KILLED"], output


def test_sigkill_leaves_a_stale_run_that_runs_clean_closes(project, capsys):
    write_tiny_params(project.params_file, **{"train.epochs": 500, "train.patience": 500})
    proc = stage(project, "train")
    wait_for_line(proc, EPOCH_LINE.format(epoch=1))
    proc.kill()
    proc.wait(timeout=30)
    killed = the_runs()[0]
    assert killed.info.status == "RUNNING"
    # A run another host is running on the same (shared) store: never touched.
    client = MlflowClient()
    other = client.create_run(killed.info.experiment_id, tags={owners.HOST_TAG: "elsewhere", owners.PID_TAG: "1"})

    states = {r.run_id: r.state for r in owners.running("mnist-cnn")}
    assert states == {killed.info.run_id: "stale", other.info.run_id: "unknown"}
    assert main(["runs", "--clean", "--params", str(project.params_file), "--root", str(project.root)]) == 0
    out = capsys.readouterr().out
    assert "closed 1 stale run(s) as KILLED" in out and killed.info.run_id in out
    assert client.get_run(killed.info.run_id).info.status == "KILLED"
    assert client.get_run(other.info.run_id).info.status == "RUNNING"


def test_next_training_closes_stale_runs_of_this_host(project, tiny_params):
    configure()
    exp_id = experiment_id("mnist-cnn")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = MlflowClient().create_run(
        exp_id, tags={owners.HOST_TAG: socket.gethostname(), owners.PID_TAG: str(dead.pid)}
    )
    train.run_train(tiny_params, project, show_progress=False)
    assert MlflowClient().get_run(stale.info.run_id).info.status == "KILLED"


# Resume after SIGKILL
def tensors_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigkill_after_epoch_2_of_4_resumes_in_the_same_run_to_identical_weights(tmp_path, project, tiny_mirror):
    # Augmentation, the weight average, BatchNorm and the best accuracy carry state: resume must restore it.
    settings = {
        "train.epochs": 4,
        "train.patience": 10,
        "train.batch_size": 16,
        "train.augment_shift": 2,
        "train.augment_rotate": 10,
        "train.augment_elastic": 34,
        "train.augment_erase": 0.5,
        "train.ema_decay": 0.9,
        "train.monitor": "val_acc",
        "model.batchnorm": True,
    }
    write_tiny_params(project.params_file, **settings)
    proc = stage(project, "train")
    wait_for_line(proc, EPOCH_LINE.format(epoch=2))
    proc.kill()
    proc.wait(timeout=30)
    checkpoint = torch.load(project.models / "checkpoint.pt", weights_only=True)
    assert 2 <= checkpoint["epoch"] < 4 and not (project.models / "model.pt").exists()
    interrupted = the_runs()[0]
    assert interrupted.info.status == "RUNNING"

    resumed = stage(project, "train")
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    assert f"resuming after epoch {checkpoint['epoch']}" in output
    assert not (project.models / "checkpoint.pt").exists()
    (run,) = the_runs()
    assert run.info.run_id == interrupted.info.run_id and run.info.status == "FINISHED"
    assert [m.step for m in MlflowClient().get_metric_history(run.info.run_id, "val_loss")] == [1, 2, 3, 4]

    # The same training, never interrupted, in another project directory and store.
    clean = tmp_path / "clean"
    shutil.copytree(tiny_mirror, clean / "data" / "raw")
    write_tiny_params(clean / "params.yaml", **settings)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'clean.db'}"}
    uninterrupted = subprocess.run(
        [sys.executable, "-m", "mnist_cnn", "train", "--no-progress"], cwd=clean, env=env, capture_output=True
    )
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    weights = [torch.load(root / "models" / "model.pt", weights_only=True) for root in (project.root, clean)]
    assert tensors_equal(*weights)
    histories = [(root / "reports" / "history.csv").read_text().splitlines() for root in (project.root, clean)]
    drop_seconds = [[",".join(line.split(",")[:-1]) for line in history] for history in histories]
    assert drop_seconds[0] == drop_seconds[1]
    infos = [json.loads((root / "models" / "train.json").read_text()) for root in (project.root, clean)]
    assert [(i["best_epoch"], i["best_val_loss"]) for i in infos] == [
        (infos[1]["best_epoch"], infos[1]["best_val_loss"])
    ] * 2


def test_a_checkpoint_of_other_params_is_not_resumed(project, tiny_params, caplog):
    write_tiny_params(project.params_file, **{"train.epochs": 500, "train.patience": 500})
    proc = stage(project, "train")
    wait_for_line(proc, EPOCH_LINE.format(epoch=1))
    proc.kill()
    proc.wait(timeout=30)
    assert (project.models / "checkpoint.pt").exists()
    caplog.set_level("INFO")
    run_id, result = train.run_train(tiny_params, project, show_progress=False)  # other epochs/patience
    assert (
        f"from a training with train.epochs = 500 (now {tiny_params.train.epochs}), train.patience = 500" in caplog.text
    )
    assert [h.epoch for h in result.history] == [1, 2]
    assert MlflowClient().get_run(run_id).info.status == "FINISHED"
    assert len(the_runs()) == 2  # the killed run was closed, not reused


def test_a_checkpoint_that_does_not_match_says_what_changed(tiny_params):
    md5s = {"train-images": "a" * 32}
    now = training_fingerprint(tiny_params, md5s)
    old_params = json.loads(now)["params"]
    del old_params["model.padding"]  # a checkpoint written before the key existed
    before_padding = json.dumps({"params": old_params, "data": md5s, "processes": 1})
    assert fingerprint_difference(before_padding, now) == "no model.padding (a newer param)"
    other = dataclasses.replace(tiny_params, train=dataclasses.replace(tiny_params.train, lr=0.5, seed=7, epochs=9))
    assert fingerprint_difference(training_fingerprint(other, {"train-images": "b" * 32}, 2), now) == (
        f"train.epochs = 9 (now {tiny_params.train.epochs}), train.lr = 0.5 (now {tiny_params.train.lr}),"
        f" train.seed = 7 (now {tiny_params.train.seed}) and 2 more"
    )
    assert fingerprint_difference("0f" * 32, now) == "other params or data"  # an older checkpoint's hash
    assert fingerprint_difference(json.dumps(json.loads(now), indent=1), now) == "other params or data"
    assert fingerprint_difference("[" * 100_000 + "]" * 100_000, now) == "other params or data"


def test_a_crash_after_the_weights_are_written_resumes_with_nothing_to_train(project, tiny_params, monkeypatch):
    """The weights are on disk but the run is not fully recorded (no train.json): the checkpoint stays,
    and the rerun finishes the same run from it instead of training again in a new one."""

    def crash(*args, **kwargs):
        raise RuntimeError("killed while recording")

    write_train_info = train.write_train_info
    monkeypatch.setattr(train, "write_train_info", crash)
    stale = project.models / "train.json"  # an earlier training's, naming its run
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_text('{"run_id": "0123456789abcdef", "val_split": 0.2, "seed": 1}\n')
    with pytest.raises(RuntimeError, match="killed while recording"):
        train.run_train(tiny_params, project, show_progress=False)
    assert (project.models / "model.pt").exists() and (project.models / "checkpoint.pt").exists()
    assert not stale.exists()  # evaluate cannot file the new weights under the old run
    (crashed,) = the_runs()
    monkeypatch.setattr(train, "write_train_info", write_train_info)

    run_id, result = train.run_train(tiny_params, project, show_progress=False)
    assert run_id == crashed.info.run_id and MlflowClient().get_run(run_id).info.status == "FINISHED"
    assert result.train_seconds < crashed.data.metrics["train_seconds"] + 1.0  # nothing trained again
    assert [m.step for m in MlflowClient().get_metric_history(run_id, "val_loss")] == [1, 2]
    assert json.loads((project.models / "train.json").read_text())["run_id"] == run_id
    assert not (project.models / "checkpoint.pt").exists() and len(the_runs()) == 1


# 3. Numbers as users write them
def test_lr_1e_minus_3_is_a_number_and_infinity_is_refused(project, tmp_path, capsys):
    text = project.params_file.read_text().replace("lr: 0.43", "lr: 1e-3")
    project.params_file.write_text(text)
    assert load_params(project.params_file).train.lr == 0.001
    assert load_params(project.params_file, {"lr": "2e-4"}).train.lr == 0.0002
    code = main(["train", "--params", str(project.params_file), "--root", str(project.root), "--lr", ".inf"])
    assert code == 2
    assert capsys.readouterr().err.strip() == f"error: {project.params_file}: train.lr = inf: expected a finite number"


# 4. Unreachable or refusing tracking server
def test_unreachable_tracking_server_fails_in_seconds_with_one_line(project, monkeypatch, capsys):
    port = free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://bob:s3cret@127.0.0.1:{port}")
    started = time.perf_counter()
    code = main(["train", "--params", str(project.params_file), "--root", str(project.root)])
    assert time.perf_counter() - started < 15
    err = error_line(capsys.readouterr().err)
    assert code == 1 and err.count("\n") == 0
    assert err == (  # the password stays out of the message
        f"error: tracking server http://bob:***@127.0.0.1:{port}: unreachable (connection refused);"
        " check MLFLOW_TRACKING_URI"
    )
    assert not (project.models / "model.pt").exists()


def test_a_password_in_the_tracking_uri_stays_out_of_every_reason():
    with pytest.raises(TrackingError) as caught:  # an invalid port: MLflow's text quotes the URL
        check_server("http://bob:s3cret@127.0.0.1:99999")
    assert "s3cret" not in str(caught.value) and "bob:***@127.0.0.1:99999" in str(caught.value)


def test_a_store_that_is_no_database_is_one_line(project, monkeypatch, capsys):
    garbage = project.root / "garbage.db"
    garbage.write_bytes(bytes(range(256)) * 20)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{garbage}")
    code = main(["train", "--params", str(project.params_file), "--root", str(project.root)])
    err = error_line(capsys.readouterr().err)
    assert code == 1
    assert err == (
        f"error: MLflow store sqlite:///{garbage}: cannot be opened (file is not a database); check MLFLOW_TRACKING_URI"
    )
    assert not (project.models / "model.pt").exists()


def _tree(root: Path) -> dict[Path, tuple[int, int, int]]:
    """Every path below ``root`` (links not followed): its mode, size and modification time."""
    return {path: (st.st_mode, st.st_size, st.st_mtime_ns) for path in root.rglob("*") for st in [path.lstat()]}


def _store_in_a_directory(root: Path) -> tuple[Path, str]:
    folder = root / "stores"
    folder.mkdir()
    return folder, f"{folder} is a directory, not a SQLite file"


def _store_below_a_file(root: Path) -> tuple[Path, str]:
    notes = root / "notes.txt"
    notes.write_text("not a folder")
    return notes / "typo" / "mlflow.db", f"{notes} is a file, not a directory"


def _store_below_a_broken_link(root: Path) -> tuple[Path, str]:
    link = root / "stores"
    link.symlink_to(root / "gone")
    return link / "mlflow.db", f"{link} is a broken link"


def _store_that_is_a_broken_link(root: Path) -> tuple[Path, str]:
    store = root / "mlflow-link.db"
    store.symlink_to(root / "gone" / "mlflow.db")
    return store, f"{store} is a broken link"


@pytest.mark.parametrize(
    "make_store", [_store_in_a_directory, _store_below_a_file, _store_below_a_broken_link, _store_that_is_a_broken_link]
)
def test_a_store_path_that_cannot_hold_a_sqlite_file_is_one_line_at_once(project, monkeypatch, capsys, make_store):
    store, reason = make_store(project.root)
    before = _tree(project.root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    start = time.monotonic()
    code = main(["train", "--params", str(project.params_file), "--root", str(project.root)])
    assert code == 1 and time.monotonic() - start < 30  # MLflow's engine alone retries for about 2 minutes
    assert error_line(capsys.readouterr().err) == (
        f"error: MLflow store sqlite:///{store}: {reason}; check MLFLOW_TRACKING_URI"
    )
    after = _tree(project.root)
    # The stage's lock file (and its folder) is all it made: no store, no lock beside the store, no weights.
    assert set(after) - set(before) == {project.models, project.models / ".lock"}
    assert {path: after[path] for path in before} == before


def answering(status: int, body: bytes) -> type[http.server.BaseHTTPRequestHandler]:
    """A web server's handler that answers every GET with ``status`` and an HTML ``body``."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(status)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    return Handler


_SomeWebPage = answering(404, b"<!DOCTYPE html>\n<html><body>Not Found</body></html>\n")


def train_against(handler: type, project, monkeypatch) -> tuple[int, str]:
    """The train stage's exit code with ``MLFLOW_TRACKING_URI`` at a local server answering with ``handler``."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        return main(["train", "--params", str(project.params_file), "--root", str(project.root)]), uri
    finally:
        server.shutdown()
        server.server_close()


def test_a_web_server_that_is_not_mlflow_is_one_line(project, monkeypatch, capsys):
    code, uri = train_against(_SomeWebPage, project, monkeypatch)
    err = error_line(capsys.readouterr().err)
    assert code == 1
    assert err == (
        f"error: tracking server {uri}: not an MLflow tracking server (HTTP 404, text/html); check MLFLOW_TRACKING_URI"
    )


class _Refusing(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Basic realm="mlflow"')
        self.end_headers()

    def log_message(self, *args):
        pass


def test_refusing_tracking_server_names_the_login(project, monkeypatch, capsys):
    code, uri = train_against(_Refusing, project, monkeypatch)
    err = error_line(capsys.readouterr().err)
    assert code == 1
    assert err == (
        f"error: tracking server {uri}: refused the login (HTTP 401); "
        "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
    )
    assert not (project.models / "model.pt").exists()


_Forbidding = answering(403, b"Permission denied")  # what MLflow's basic-auth app answers a user without permission


def test_a_login_without_permission_on_the_probe_passes_and_a_refusal_later_is_one_line(project, monkeypatch, capsys):
    """MLflow's auth answers 403 for experiment "Default" to a user who may still use their own
    experiments: the preflight lets the login through; a refusal on a real call is then one line."""
    code, uri = train_against(_Forbidding, project, monkeypatch)
    err = error_line(capsys.readouterr().err)
    assert code == 1
    assert "refused the login" not in err
    assert err.startswith("error: ") and "403" in err and "Permission denied" in err, err


def test_a_403_that_is_not_mlflows_permission_check_is_one_line(project, monkeypatch, capsys):
    """A proxy or another web server refusing everyone is not MLflow's auth withholding "Default"."""
    nginx = answering(403, b"<html><head><title>403 Forbidden</title></head><body>nginx</body></html>\n")
    code, uri = train_against(nginx, project, monkeypatch)
    err = error_line(capsys.readouterr().err)
    page = "<html><head><title>403 Forbidden</title></head><body>nginx</body></html>"
    assert (code, err) == (
        1,
        f"error: tracking server {uri}: refused (HTTP 403, text/html: {page[:80]!r}), not by MLflow's permission"
        " check; check MLFLOW_TRACKING_URI, the server's --allowed-hosts and any proxy in front of it",
    )
    assert not (project.models / "model.pt").exists()


# 5. Evaluate does not rewrite history
def test_failed_evaluate_keeps_the_run_finished_and_the_champion(project, tiny_params, capsys):
    run_id, _ = train.run_train(tiny_params, project, show_progress=False)
    evaluate.run_evaluate(tiny_params, project)
    client = MlflowClient()
    (project.models / "model.pt").write_bytes(b"PK\x03\x04 not really a zip")
    code = main(["evaluate", "--params", str(project.params_file), "--root", str(project.root)])
    err = error_line(capsys.readouterr().err)
    assert code == 1 and "model.pt: not a readable weights file" in err and "weights_only" not in err
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert (
        run.data.tags["evaluate.status"] == "FAILED"
        and "not a readable weights file" in run.data.tags["evaluate.error"]
    )
    assert client.get_model_version_by_alias("mnist-cnn", "champion").run_id == run_id


def test_evaluating_the_same_weights_again_registers_no_new_version(project, tiny_params):
    run_id, _ = train.run_train(tiny_params, project, show_progress=False)
    evaluate.run_evaluate(tiny_params, project)
    evaluate.run_evaluate(tiny_params, project)
    versions = MlflowClient().search_model_versions("name = 'mnist-cnn'")
    assert [(str(v.version), v.run_id) for v in versions] == [("1", run_id)]
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["evaluate.status"] == "FINISHED"


def test_evaluate_with_another_split_than_training_is_refused(project, tiny_params, capsys):
    run_id, _ = train.run_train(tiny_params, project, show_progress=False)
    args = ["evaluate", "--params", str(project.params_file), "--root", str(project.root)]
    assert main([*args, "--val_split", "0.3"]) == 1
    err = error_line(capsys.readouterr().err)
    assert err.startswith("error: train.val_split = 0.3, but the weights were trained with 0.2")
    assert "overlap the training data" in err
    run = MlflowClient().get_run(run_id)
    assert "final_val_acc" not in run.data.metrics and run.info.status == "FINISHED"
    assert not (project.reports / "metrics.json").exists()


# 7. One line, not a traceback
def mount_or_skip(*args: str) -> None:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root and mount(8) to make a full or read-only file system")
    result = subprocess.run(["mount", *args], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"mount refused here: {result.stderr.strip()}")


@pytest.fixture
def mounted():
    points = []
    yield points
    for point in reversed(points):
        subprocess.run(["umount", "-l", str(point)], check=False)


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_full_or_read_only_reports_dir_is_one_line_and_leaves_nothing(project, tiny_params, fault, mounted, capsys):
    train.run_train(tiny_params, project, show_progress=False)
    reports = project.reports
    shutil.rmtree(reports)
    reports.mkdir()
    if fault == "full":
        mount_or_skip("-t", "tmpfs", "-o", "size=16k", "tmpfs", str(reports))
        mounted.append(reports)
        (reports / "filler").write_bytes(b"\0" * 12_000)
    else:
        mount_or_skip("--bind", str(reports), str(reports))
        mounted.append(reports)
        mount_or_skip("-o", "remount,ro,bind", str(reports))
    code = main(["evaluate", "--params", str(project.params_file), "--root", str(project.root)])
    err = error_line(capsys.readouterr().err)
    assert code == 1
    reason = "No space left on device" if fault == "full" else "Read-only file system"
    assert err.startswith(f"error: {reports}/") and f"cannot write ({reason})" in err
    assert sorted(p.name for p in reports.iterdir()) == (["filler"] if fault == "full" else [])


def test_params_pointing_at_a_directory_is_one_line(project, capsys):
    code = main(["train", "--params", str(project.root), "--root", str(project.root)])
    assert code == 2
    assert capsys.readouterr().err.strip() == f"error: {project.root}: is a directory, expected a params YAML file"


# 8. Data changed after download
def test_stage_run_directly_refuses_data_changed_since_download(project, capsys):
    images = project.data / "train-images-idx3-ubyte.gz"
    blob = bytearray(images.read_bytes())
    blob[-10] ^= 0xFF
    images.write_bytes(bytes(blob))
    code = main(["train", "--params", str(project.params_file), "--root", str(project.root)])
    err = error_line(capsys.readouterr().err)
    assert code == 1 and err.startswith(f"error: {images}: MD5 ") and "changed since download" in err
    assert the_runs() == [] and not (project.models / "model.pt").exists()


# 9. Files a teammate can read
def test_outputs_follow_the_umask(project, tiny_params):
    previous = os.umask(0o002)
    try:
        train.run_train(tiny_params, project, show_progress=False)
    finally:
        os.umask(previous)
    for path in (project.models / "model.pt", project.models / "train.json", project.reports / "history.csv"):
        assert path.stat().st_mode & 0o777 == 0o664, path


# 10. One bad param does not break unrelated stages
def test_bad_train_param_does_not_stop_the_download_stage(project, tiny_mirror, capsys):
    shutil.rmtree(project.data)
    write_tiny_params(project.params_file, **{"train.lr": -1})
    args = ["--params", str(project.params_file), "--root", str(project.root)]
    assert main(["download", *args, "--mirror", str(tiny_mirror)]) == 0
    assert len(list(project.data.iterdir())) == 4
    assert main(["train", *args]) == 2
    assert "train.lr = -1.0: expected a number > 0" in capsys.readouterr().err


def test_full_disk_while_training_is_one_line_and_the_run_failed(project, mounted, capsys):
    models = project.models
    models.mkdir()
    mount_or_skip("-t", "tmpfs", "-o", "size=16k", "tmpfs", str(models))
    mounted.append(models)
    code = main(["train", "--params", str(project.params_file), "--root", str(project.root)])
    err = error_line(capsys.readouterr().err)
    assert code == 1
    assert err == f"error: {models}/checkpoint.pt: cannot write (No space left on device)"
    assert [p.name for p in models.iterdir()] == [".lock"]  # the stage lock; no partial file
    assert [run.info.status for run in the_runs()] == ["FAILED"]


def test_second_training_in_the_same_directory_waits_for_the_first(project):
    write_tiny_params(project.params_file, **{"train.epochs": 500, "train.patience": 500})
    first = stage(project, "train")
    second = None
    try:
        wait_for_line(first, EPOCH_LINE.format(epoch=1))
        second = stage(project, "train", "--epochs", "2")
        wait_for_line(second, "waiting for it to finish", timeout=60)
        assert first.poll() is None and second.poll() is None
    finally:
        for proc in (first, second):
            if proc is not None:
                proc.kill()
                proc.wait(timeout=30)


def test_killed_training_whose_run_was_deleted_starts_a_new_run(project, tiny_params):
    write_tiny_params(project.params_file, **{"train.epochs": 2})
    proc = stage(project, "train")
    wait_for_line(proc, EPOCH_LINE.format(epoch=1))
    proc.kill()
    proc.wait(timeout=30)
    (killed,) = the_runs()
    MlflowClient().delete_run(killed.info.run_id)
    run_id, result = train.run_train(tiny_params, project, show_progress=False)
    assert run_id != killed.info.run_id
    assert MlflowClient().get_run(run_id).info.status == "FINISHED"
    assert [m.step for m in MlflowClient().get_metric_history(run_id, "val_loss")] == [1, 2]


@pytest.mark.parametrize("content", ['{"run_id": 5}', '{"run_id": null}', "{garbage"])
def test_train_json_without_a_run_id_string_is_one_line(project, content, capsys):
    project.models.mkdir()
    (project.models / "train.json").write_text(content)
    assert main(["evaluate", "--params", str(project.params_file), "--root", str(project.root)]) == 1
    err = error_line(capsys.readouterr().err)
    assert err.endswith("train.json: expected JSON with a run_id (rerun the train stage)")
