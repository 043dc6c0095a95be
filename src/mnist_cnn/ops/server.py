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

``start`` records what it started in ``--home`` (``server_state``): the other commands need only ``--home``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

from mnist_cnn.ops.net import LOOPBACK, describe_process, is_healthy, listening_pids, listens_on, port_taken
from mnist_cnn.ops.server_state import (
    SETTINGS,
    ServerConfig,
    ServerError,
    forget_server,
    read_state,
    recorded_server,
    save_state,
    terminate,
)

__all__ = ["ServerConfig", "ServerError", "admin_password", "read_state", "start", "status", "stop"]

ADMIN = "admin"

DB_USER = "mlflow"

DATABASES = ("mlflow", "mlflow_auth")  # runs and registry; users and permissions

MIN_PASSWORD = 12  # MLflow 3's password policy (mlflow.utils.validation._validate_password), the admin's too

AUTH_CACHE_SECONDS = 60
MAX_USERNAME = 255  # the auth database's users.username is VARCHAR(255)


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


def admin_password() -> str:
    password = os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD", "")
    if not password:
        raise ServerError("MLFLOW_AUTH_ADMIN_PASSWORD is not set: the admin password comes from the environment only")
    if len(password) < MIN_PASSWORD:
        raise ServerError(
            f"MLFLOW_AUTH_ADMIN_PASSWORD has {len(password)} characters; MLflow requires at least {MIN_PASSWORD}"
        )
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
        # MLflow checks the password's scrypt hash on every request (0.11 s of CPU here) unless it
        # caches good logins; without the cache the server's workers spent 200 s of CPU on the four
        # tiny trainings of the team-server test. A changed or deleted password stops working on
        # other workers within this many seconds.
        f"auth_cache_ttl_seconds = {AUTH_CACHE_SECONDS}\n"
    )
    return path


def _log(cfg: ServerConfig) -> Path:
    return cfg.home.resolve() / "mlflow-server.log"


def _pg_ctl(cfg: ServerConfig, *args: str) -> subprocess.CompletedProcess:
    return _as_postgres([_pg_bin("pg_ctl"), "-D", str(cfg.pgdata), *args])


def _postgres_running(cfg: ServerConfig) -> bool:
    return cfg.pgdata.is_dir() and _pg_ctl(cfg, "status").returncode == 0


def _postgres_port(cfg: ServerConfig) -> int:
    """The port the running PostgreSQL listens on (line 4 of its postmaster.pid), else ``cfg.db_port``."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int((cfg.pgdata / "postmaster.pid").read_text().splitlines()[3])
    return cfg.db_port


def _stop_postgres(cfg: ServerConfig) -> str:
    """Stop this home's PostgreSQL, once postmaster.pid names a postgres serving this pgdata; say what was done."""
    import psutil

    try:
        pid = int((cfg.pgdata / "postmaster.pid").read_text().split()[0])
        ours = str(cfg.pgdata) in psutil.Process(pid).cmdline()
    except (OSError, ValueError, IndexError, psutil.Error):
        return ""  # not running (a postmaster.pid of a dead process is PostgreSQL's own to clean up)
    if not ours:
        return f"PostgreSQL not signalled: its postmaster.pid names {describe_process(pid)}"
    _pg_ctl(cfg, "-m", "fast", "-w", "stop")
    return "PostgreSQL stopped"


def _is_up(cfg: ServerConfig, process) -> bool:
    """Our server, not merely someone's: ``process`` (or a worker it forked) holds the LISTEN socket on the
    port, and /health answers."""
    return listens_on(process, cfg.port) and is_healthy(cfg.admin_url)


def _refuse_taken_ports(cfg: ServerConfig, postgres_running: bool) -> None:
    wanted = [(cfg.host, cfg.port, "--port")] + ([] if postgres_running else [(LOOPBACK, cfg.db_port, "--db-port")])
    for host, port, flag in wanted:
        if port_taken(host, port):
            holders = ", ".join(describe_process(pid) for pid in listening_pids(port))
            raise ServerError(
                f"{host}:{port} is already taken{' by ' + holders if holders else ''}: nothing started; "
                f"choose another {flag}"
            )


def _already_running(cfg: ServerConfig, process) -> str:
    """The running server's URL, when ``cfg`` asks for the same one; its database started again if down."""
    state = read_state(cfg.home)
    running = ServerConfig(home=cfg.home, **{key: state[key] for key in SETTINGS})
    differing = [
        f"--{key.replace('_', '-')} {getattr(cfg, key)}" for key in SETTINGS if getattr(cfg, key) != state[key]
    ]
    if differing:
        raise ServerError(
            f"the server of {cfg.home} already runs at {running.url} (pid {process.pid}); "
            f"`server stop` first to start it with {', '.join(differing)}"
        )
    if not _postgres_running(cfg):
        _start_postgres(running)
    return running.url


def _launch(cfg: ServerConfig, admin_secret: str, db_password: str) -> subprocess.Popen:
    import psutil

    home = cfg.home.resolve()
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", _db_uri(cfg, "mlflow"),
        "--artifacts-destination", cfg.artifacts_destination or str(home / "artifacts"),
        "--host", cfg.host, "--port", str(cfg.port),
        "--app-name", "basic-auth",
        "--workers", str(cfg.workers),
    ]  # fmt: skip
    if cfg.server_allowed_hosts:
        command += ["--allowed-hosts", cfg.server_allowed_hosts]
    env = {
        **os.environ,
        "PGPASSWORD": db_password,
        "MLFLOW_AUTH_CONFIG_PATH": str(_write_auth_config(cfg)),
        "MLFLOW_AUTH_ADMIN_PASSWORD": admin_secret,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY")
        or _secret(home / "flask-secret"),
        # Off unless asked for: MLflow's job runner (GenAI evaluation jobs, trace roll-ups; nothing this
        # project uses) is 8 more processes, and on a small machine it doubles the time to start.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false"),
    }
    with open(_log(cfg), "ab") as out:
        launched = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    recorded = {"pid": launched.pid, "create_time": psutil.Process(launched.pid).create_time()}
    save_state(cfg.home, {key: getattr(cfg, key) for key in SETTINGS} | recorded | {"backend_store_uri": command[5]})
    return launched


def _wait_until_up(cfg: ServerConfig, launched: subprocess.Popen, wait_s: float) -> None:
    import psutil

    process = psutil.Process(launched.pid)
    log = _log(cfg)
    deadline = time.time() + wait_s
    while time.time() < deadline:
        if launched.poll() is not None:
            raise ServerError(f"mlflow server exited with {launched.returncode} ({log}): {_last_error(log)}")
        if _is_up(cfg, process):
            return
        time.sleep(0.5)
    raise ServerError(f"mlflow server did not answer on {cfg.admin_url}/health within {wait_s:.0f} s ({log})")


def _last_error(log: Path) -> str:
    """The log's last line that names an error (a traceback's last line, uvicorn's "ERROR: ..."), else its last."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()] or ["(empty)"]
    return next((line for line in reversed(lines) if "error" in line.lower() or "exception" in line.lower()), lines[-1])


def start(cfg: ServerConfig, wait_s: float = 180.0) -> str:
    """Start PostgreSQL and the MLflow server (each only if not running); return the server's URL.
    Refused with nothing started when a port is taken; a start that fails stops what it started."""
    import psutil

    admin_secret = admin_password()
    home = cfg.home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    process, _ = recorded_server(cfg)
    if process is not None:
        return _already_running(cfg, process)
    postgres_running = _postgres_running(cfg)
    if postgres_running and _postgres_port(cfg) != cfg.db_port:
        raise ServerError(
            f"PostgreSQL of {cfg.home} already runs on {LOOPBACK}:{_postgres_port(cfg)}; "
            f"give --db-port {_postgres_port(cfg)} or `server stop` first"
        )
    _refuse_taken_ports(cfg, postgres_running)
    launched = None
    try:
        db_password = _secret(home / "db-password")
        _init_postgres(cfg, db_password)
        if not postgres_running:
            _start_postgres(cfg)
        _create_databases(cfg, db_password)
        launched = _launch(cfg, admin_secret, db_password)
        _wait_until_up(cfg, launched, wait_s)
    except BaseException:  # Ctrl-C too: a start that did not finish leaves nothing running
        if launched is not None:
            with contextlib.suppress(psutil.NoSuchProcess):
                terminate(psutil.Process(launched.pid))
            forget_server(cfg)
        if not postgres_running:
            _stop_postgres(cfg)
        raise
    return cfg.url


def stop(cfg: ServerConfig) -> str:
    """Stop the recorded MLflow server (its process group, once verified) and PostgreSQL; say what was done.
    A recorded pid that is now another process is left alone."""
    process, why = recorded_server(cfg)
    done = []
    if process is not None:
        terminate(process)
        done.append(f"MLflow server (pid {process.pid}) stopped")
    elif why.startswith("stale"):
        done.append(f"MLflow server not signalled ({why})")
    if read_state(cfg.home) is not None:
        forget_server(cfg)
    done.append(_stop_postgres(cfg))
    return "; ".join(line for line in done if line) or "nothing was running"


def status(cfg: ServerConfig) -> dict[str, str]:
    """One line each for PostgreSQL and the MLflow server; the server is "degraded" while its database is down."""
    postgres_running = _postgres_running(cfg)
    return {
        "postgresql": f"running on {LOOPBACK}:{_postgres_port(cfg)}" if postgres_running else "stopped",
        "mlflow server": _server_status(cfg, postgres_running),
    }


def _server_status(cfg: ServerConfig, postgres_running: bool) -> str:
    process, why = recorded_server(cfg)
    if process is None:
        return why if why.startswith("stale") else f"stopped (it exited: see {_log(cfg)})" if why else "stopped"
    if not _is_up(cfg, process):
        return f"pid {process.pid}, not answering at {cfg.url}"
    if not postgres_running:
        return (
            f"degraded: pid {process.pid} at {cfg.url} has no database (PostgreSQL is stopped); "
            "`server start` starts it again"
        )
    return f"running (pid {process.pid}) at {cfg.url}"
