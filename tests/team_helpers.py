"""The team's server in a test: PostgreSQL and `mlflow server` (basic auth) on free loopback ports, in a
home outside pytest's tmp dir, with two users; stopped with everything it started."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from conftest import free_port
from mnist_cnn.ops import server, server_users

ADMIN_PASSWORD = "admin-password-for-tests"
USERS = {"alice": "alice-password-1", "bob": "bob-password-22"}


def have_postgres() -> bool:
    return bool(shutil.which("initdb") or glob.glob("/usr/lib/postgresql/*/bin/initdb"))


def skip_without_postgres() -> None:
    if not have_postgres():
        pytest.skip("PostgreSQL is not installed (.ci/run installs it with apt-get where it can)")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.skip("running as root needs runuser to start PostgreSQL as the postgres user")


def new_server_config(monkeypatch, **settings) -> server.ServerConfig:
    """Free loopback ports, and a home outside pytest's tmp dir, whose parents are private (0700) to
    the postgres user."""
    home = Path(tempfile.mkdtemp(prefix="mnist-cnn-server-"))
    home.chmod(0o755)
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", ADMIN_PASSWORD)
    return server.ServerConfig(home=home, port=free_port(), db_port=free_port(), **settings)


@contextlib.contextmanager
def running_team_server(cfg: server.ServerConfig, server_env: Mapping[str, str] = {}) -> Iterator[server.ServerConfig]:
    """``cfg``'s server started, with ``server_env`` in its environment alone, and USERS added; then
    stopped, its home removed."""
    try:
        with pytest.MonkeyPatch.context() as patch:
            for name, value in server_env.items():
                patch.setenv(name, value)
            server.start(cfg)
        for name, password in USERS.items():
            server_users.add_user(cfg.url, name, password)
        yield cfg
    finally:
        server.stop(cfg)
        shutil.rmtree(cfg.home, ignore_errors=True)
