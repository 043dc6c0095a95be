"""The team's tracking server: PostgreSQL as the backend store and ``mlflow server`` with proxied
artifacts and MLflow's basic-auth app, all kept under one directory (``--home``).

    MLFLOW_AUTH_ADMIN_PASSWORD=... python -m mnist_cnn server start [--port 5000] [--db-port 5433]
    MLFLOW_AUTH_ADMIN_PASSWORD=... python -m mnist_cnn server add-user alice      # password on stdin
    python -m mnist_cnn server status | stop

Clients need only the URL: ``MLFLOW_TRACKING_URI=http://HOST:PORT MLFLOW_TRACKING_USERNAME=alice
MLFLOW_TRACKING_PASSWORD=... dvc repro``. PostgreSQL listens on 127.0.0.1 only; as root it runs as
the ``postgres`` user (``initdb`` and ``postgres`` refuse root). The admin password comes from the
environment only; the database password and Flask's secret key are generated into ``--home``
(mode 0600).
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from mnist_cnn.core.errors import ProjectError
from mnist_cnn.ops.net import is_healthy

ADMIN = "admin"


DB_USER = "mlflow"


DATABASES = ("mlflow", "mlflow_auth")  # runs and registry; users and permissions


class ServerError(ProjectError, RuntimeError):
    """The server could not be started, reached or changed."""


@dataclass(frozen=True)
class ServerConfig:
    home: Path = Path(".mlflow-server")
    host: str = "127.0.0.1"
    port: int = 5000
    db_port: int = 5433
    artifacts_destination: str | None = None  # default <home>/artifacts; s3://bucket/prefix with boto3
    allowed_hosts: str | None = None  # e.g. "mlflow.example.org,mlflow.example.org:5000"
    workers: int = 2

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pgdata(self) -> Path:
        return self.home.resolve() / "pgdata"


def _pg_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if found is None:
        raise ServerError(f"PostgreSQL's {name} not found (apt-get install postgresql, or put its bin/ on PATH)")
    return found


def _as_postgres(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run a PostgreSQL program; as root, as the ``postgres`` user (its programs refuse root)."""
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    return subprocess.run(prefix + args, capture_output=True, text=True, timeout=120, **kwargs)


def _secret(path: Path) -> str:
    """A generated secret kept in ``path`` (0600), created on first use."""
    if not path.exists():
        path.write_text(secrets.token_urlsafe(32))
        path.chmod(0o600)
    return path.read_text().strip()


def _admin_password() -> str:
    password = os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD", "")
    if not password:
        raise ServerError("MLFLOW_AUTH_ADMIN_PASSWORD is not set: the admin password comes from the environment only")
    return password


def _init_postgres(cfg: ServerConfig, db_password: str) -> None:
    pgdata = cfg.pgdata
    if (pgdata / "PG_VERSION").exists():
        return
    pgdata.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(pgdata, "postgres", "postgres")
        if _as_postgres(["test", "-w", str(pgdata)]).returncode != 0:
            raise ServerError(
                f"{cfg.home}: the postgres user cannot reach it (a parent directory is private); "
                "use a directory such as /srv/mlflow"
            )
    pwfile = cfg.home.resolve() / ".initdb-password"
    pwfile.write_text(db_password + "\n")
    try:
        pwfile.chmod(0o600)
        if os.geteuid() == 0:
            shutil.chown(pwfile, "postgres", "postgres")
        done = _as_postgres(
            [_pg_bin("initdb"), "-D", str(pgdata), "-U", DB_USER, "--auth=scram-sha-256", f"--pwfile={pwfile}"]
        )
    finally:
        pwfile.unlink(missing_ok=True)
    if done.returncode != 0:
        raise ServerError(f"initdb {pgdata} failed: {done.stderr.strip().splitlines()[-1:]}")


def _start_postgres(cfg: ServerConfig) -> None:
    options = f"-c listen_addresses=127.0.0.1 -c port={cfg.db_port} -c unix_socket_directories=''"
    log = cfg.pgdata / "postgres.log"
    done = _as_postgres([_pg_bin("pg_ctl"), "-D", str(cfg.pgdata), "-l", str(log), "-o", options, "-w", "start"])
    if done.returncode != 0:
        tail = log.read_text().strip().splitlines()[-1:] if log.exists() else done.stderr.strip().splitlines()[-1:]
        raise ServerError(f"PostgreSQL did not start on 127.0.0.1:{cfg.db_port}: {tail}")


def _create_databases(cfg: ServerConfig, db_password: str) -> None:
    import psycopg

    with psycopg.connect(
        host="127.0.0.1", port=cfg.db_port, user=DB_USER, password=db_password, dbname="postgres", autocommit=True
    ) as conn:
        existing = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
        for name in DATABASES:
            if name not in existing:
                conn.execute(f'CREATE DATABASE "{name}"')


def _db_uri(cfg: ServerConfig, name: str) -> str:
    # No password in the URI (it would show in `ps`): libpq reads PGPASSWORD.
    return f"postgresql://{DB_USER}@127.0.0.1:{cfg.db_port}/{name}"


def _write_auth_config(cfg: ServerConfig) -> Path:
    path = cfg.home.resolve() / "basic_auth.ini"
    path.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"  # everyone reads; only owners (and granted users) edit
        f"database_uri = {_db_uri(cfg, 'mlflow_auth')}\n"
        f"admin_username = {ADMIN}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    return path


def _pid_file(cfg: ServerConfig) -> Path:
    return cfg.home.resolve() / "mlflow-server.pid"


def _server_pid(cfg: ServerConfig) -> int | None:
    import psutil

    try:
        pid = int(_pid_file(cfg).read_text())
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap it if this process started it
        if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return None
    except (OSError, ValueError, psutil.NoSuchProcess):
        return None
    return pid


def start(cfg: ServerConfig, wait_s: float = 180.0) -> str:
    """Start PostgreSQL and the MLflow server (each only if not running); return the server's URL."""
    admin_password = _admin_password()
    home = cfg.home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    db_password = _secret(home / "db-password")
    _init_postgres(cfg, db_password)
    if _as_postgres([_pg_bin("pg_ctl"), "-D", str(cfg.pgdata), "status"]).returncode != 0:
        _start_postgres(cfg)
    _create_databases(cfg, db_password)
    if _server_pid(cfg) is not None:
        return cfg.url
    destination = cfg.artifacts_destination or str(home / "artifacts")
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", _db_uri(cfg, "mlflow"),
        "--artifacts-destination", destination,
        "--host", cfg.host, "--port", str(cfg.port),
        "--app-name", "basic-auth",
        "--workers", str(cfg.workers),
    ]  # fmt: skip
    if cfg.allowed_hosts:
        command += ["--allowed-hosts", cfg.allowed_hosts]
    env = {
        **os.environ,
        "PGPASSWORD": db_password,
        "MLFLOW_AUTH_CONFIG_PATH": str(_write_auth_config(cfg)),
        "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY")
        or _secret(home / "flask-secret"),
    }
    log = home / "mlflow-server.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    _pid_file(cfg).write_text(str(proc.pid))
    deadline = time.time() + wait_s
    while time.time() < deadline:
        if proc.poll() is not None:
            tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
            raise ServerError(f"mlflow server exited with {proc.returncode} ({log}): {tail}")
        if is_healthy(cfg.url):
            return cfg.url
        time.sleep(0.5)
    stop(cfg)
    raise ServerError(f"mlflow server did not answer on {cfg.url}/health within {wait_s:.0f} s ({log})")


def stop(cfg: ServerConfig) -> None:
    """Stop the MLflow server (its whole process group) and PostgreSQL; harmless when neither runs."""
    pid = _server_pid(cfg)
    if pid is not None:
        os.killpg(pid, signal.SIGTERM)
        deadline = time.time() + 20
        while time.time() < deadline and _server_pid(cfg) is not None:
            time.sleep(0.2)
        if _server_pid(cfg) is not None:
            os.killpg(pid, signal.SIGKILL)
    _pid_file(cfg).unlink(missing_ok=True)
    if (cfg.pgdata / "postmaster.pid").exists():
        _as_postgres([_pg_bin("pg_ctl"), "-D", str(cfg.pgdata), "-m", "fast", "-w", "stop"])


def status(cfg: ServerConfig) -> dict[str, str]:
    pg = _as_postgres([_pg_bin("pg_ctl"), "-D", str(cfg.pgdata), "status"]).returncode == 0
    pid = _server_pid(cfg)
    return {
        "postgresql": f"running on 127.0.0.1:{cfg.db_port}" if pg else "stopped",
        "mlflow server": (f"running (pid {pid}) at {cfg.url}" if is_healthy(cfg.url) else f"pid {pid}, not answering")
        if pid
        else "stopped",
    }


def add_user(url: str, username: str, password: str) -> None:
    """Create a login through the server's own API, as the admin."""
    import requests

    try:
        response = requests.post(
            f"{url}/api/2.0/mlflow/users/create",
            json={"username": username, "password": password},
            auth=(ADMIN, _admin_password()),
            timeout=30,
        )
    except requests.RequestException as exc:
        raise ServerError(f"{url}: unreachable ({type(exc).__name__}); is the server started?") from None
    if response.status_code != 200:
        raise ServerError(
            f"{url}: could not create user {username!r} (HTTP {response.status_code}: {response.text[:200]})"
        )
