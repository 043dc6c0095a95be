"""``server start`` refuses to run without the admin password, before starting anything."""

from __future__ import annotations

from mnist_cnn.cli import main


def test_start_without_admin_password_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    assert main(["server", "start", "--home", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip() == (
        "error: MLFLOW_AUTH_ADMIN_PASSWORD is not set: the admin password comes from the environment only"
    )
