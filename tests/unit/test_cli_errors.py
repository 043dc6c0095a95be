"""One line, not a traceback, before any MLflow store exists: numbers as users write them, a dead,
foreign or refusing tracking server (local HTTP servers in a thread), store paths that cannot hold a
SQLite file, a bad params path or key, a bad train.json; a checkpoint that does not match."""

from __future__ import annotations

import dataclasses
import http.server
import json
import shutil
import threading
import time
from pathlib import Path

import pytest

from conftest import error_line, free_port, write_tiny_params
from mnist_cnn.cli import main
from mnist_cnn.core.checkpoint import fingerprint_difference, training_fingerprint
from mnist_cnn.core.params import load_params
from mnist_cnn.tracking.store import TrackingError, check_server


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


def test_a_server_that_accepts_but_never_answers_is_called_slow_not_unreachable(monkeypatch):
    import socket

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    with socket.socket() as listener:  # the port is open, nothing ever answers: a server busy starting
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        started = time.perf_counter()
        with pytest.raises(TrackingError) as caught:
            check_server(url)
    assert time.perf_counter() - started < 5
    assert str(caught.value) == (
        f"tracking server {url}: accepted the connection but sent no answer in 1 s (starting, overloaded,"
        " or waiting for its database); check the server's log, or wait longer with MLFLOW_HTTP_REQUEST_TIMEOUT"
    )


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


def test_params_pointing_at_a_directory_is_one_line(project, capsys):
    code = main(["train", "--params", str(project.root), "--root", str(project.root)])
    assert code == 2
    assert capsys.readouterr().err.strip() == f"error: {project.root}: is a directory, expected a params YAML file"


# 10. One bad param does not break unrelated stages
def test_bad_train_param_does_not_stop_the_download_stage(project, tiny_mirror, capsys):
    shutil.rmtree(project.data)
    write_tiny_params(project.params_file, **{"train.lr": -1})
    args = ["--params", str(project.params_file), "--root", str(project.root)]
    assert main(["download", *args, "--mirror", str(tiny_mirror)]) == 0
    assert len(list(project.data.iterdir())) == 4
    assert main(["train", *args]) == 2
    assert "train.lr = -1.0: expected a number > 0" in capsys.readouterr().err


@pytest.mark.parametrize("content", ['{"run_id": 5}', '{"run_id": null}', "{garbage"])
def test_train_json_without_a_run_id_string_is_one_line(project, content, capsys):
    project.models.mkdir()
    (project.models / "train.json").write_text(content)
    assert main(["evaluate", "--params", str(project.params_file), "--root", str(project.root)]) == 1
    err = error_line(capsys.readouterr().err)
    assert err.endswith("train.json: expected JSON with a run_id (rerun the train stage)")
