"""What the team server is (``ServerConfig``) and what ``start`` recorded of it in ``--home``/server.json:
its settings, the MLflow server's pid and that process's start time. ``status``, ``add-user`` and
``stop`` read it, so they need only ``--home``; a recorded pid is trusted only while it is still that
very process running this home's ``mlflow server`` (a reboot or a crash leaves a pid that another
process may get)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from mnist_cnn.core.errors import ProjectError
from mnist_cnn.ops.net import LOOPBACK, describe_process

STATE = "server.json"  # in --home: what `start` started

SETTINGS = ("host", "port", "db_port", "allowed_hosts", "artifacts_destination")  # recorded in STATE


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
    def admin_url(self) -> str:
        """Where the admin commands, run on the server's machine, reach it: on loopback when it listens
        on all addresses."""
        return f"http://{LOOPBACK if self.host in ('0.0.0.0', '::', '') else self.host}:{self.port}"

    @property
    def server_allowed_hosts(self) -> str | None:
        """``--allowed-hosts`` for ``mlflow server``: the user's names, plus the admin URL's ``host:port``.
        The admin commands talk to the server through ``admin_url``, and with ``--allowed-hosts`` MLflow
        answers any other Host header 403 ("Invalid Host header - possible DNS rebinding attack").
        Without the option MLflow's default already allows loopback and private addresses."""
        if not self.allowed_hosts:
            return None
        names = [*self.allowed_hosts.split(","), self.admin_url.removeprefix("http://")]
        return ",".join(dict.fromkeys(name.strip() for name in names if name.strip()))

    @property
    def pgdata(self) -> Path:
        return self.home.resolve() / "pgdata"


def read_state(home: Path) -> dict | None:
    """What ``start`` recorded in ``home`` (None if it never ran there)."""
    path = home.resolve() / STATE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ServerError(f"{path}: unreadable ({type(exc).__name__}); remove it if no server runs") from None
    if not isinstance(state, dict) or not set(SETTINGS) <= set(state):
        raise ServerError(f"{path}: expected a JSON object with {', '.join(SETTINGS)}; remove it if no server runs")
    return state


def save_state(home: Path, state: dict) -> None:
    """Written whole or not at all: a reader never sees half a file (a temporary file, then a rename)."""
    path = home.resolve() / STATE
    partial = path.with_name(f".{STATE}.{os.getpid()}.tmp")
    partial.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(partial, path)


def forget_server(cfg: ServerConfig) -> None:
    """Keep the settings (the next ``start`` reuses them), drop the server's pid."""
    save_state(cfg.home, {key: getattr(cfg, key) for key in SETTINGS})


def recorded_config(home: Path, given: dict, starting: bool = False) -> ServerConfig:
    """The server of ``home`` as ``start`` recorded it, overridden by the options the user gave (``given``).
    Only ``start`` changes settings: for the other commands an option that contradicts a recorded
    server's is refused, not obeyed (it would send them to a port where nothing listens)."""
    state = read_state(home)
    if state is None:
        return ServerConfig(home=home, **given)
    if not starting and "pid" in state:
        for key, value in given.items():
            if value != state[key]:
                flag = "--" + key.replace("_", "-")
                raise ServerError(
                    f"{flag} {value}: the server of {home} was started with {flag} {state[key]} "
                    f"({home.resolve() / STATE}); leave {flag} out"
                )
    return ServerConfig(home=home, **{**{key: state[key] for key in SETTINGS}, **given})


def _is_this_homes_server(command: list[str], state: dict) -> bool:
    """``python -m mlflow server --backend-store-uri <this home's database> ... --port <its port>``."""

    def after(flag: str) -> str | None:
        return command[command.index(flag) + 1] if flag in command[:-1] else None

    is_mlflow_server = any(command[i : i + 3] == ["-m", "mlflow", "server"] for i in range(len(command)))
    return (
        is_mlflow_server
        and after("--backend-store-uri") == state.get("backend_store_uri")
        and after("--port") == str(state["port"])
    )


def recorded_server(cfg: ServerConfig):
    """``(process, "")`` for the server ``start`` recorded, while that very process still runs this home's
    ``mlflow server`` (same pid, same start time, same command line); else ``(None, why)``: "" when none
    was recorded, "exited", or "stale: ..." when the pid is now someone else's (a reboot, a crash)."""
    import psutil

    state = read_state(cfg.home)
    if not state or "pid" not in state:
        return None, ""
    pid, recorded_time = state["pid"], state.get("create_time")
    if type(pid) is not int or pid <= 0:  # 0 and -1 would mean process groups to waitpid and kill
        raise ServerError(f"{cfg.home.resolve() / STATE}: pid = {pid!r}: expected a process id (an integer > 0)")
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reap it if this process started it
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None, "exited"
        same_process = isinstance(recorded_time, float) and abs(process.create_time() - recorded_time) < 0.05
        if same_process and _is_this_homes_server(process.cmdline(), state):
            return process, ""
    except psutil.NoSuchProcess:
        return None, "exited"
    except psutil.Error:  # AccessDenied: not a process this user started
        pass
    return None, f"stale: the recorded pid is now another process, {describe_process(pid)}"


def terminate(process) -> None:
    """SIGTERM to the server's process group (it leads it: started in a session of its own), then SIGKILL
    to whatever of it is left after 20 s. ``process`` is a verified ``psutil.Process``."""
    import psutil

    with contextlib.suppress(psutil.Error):
        family = [process, *process.children(recursive=True)]
        leads_group = os.getpgid(process.pid) == process.pid

        def send(sig: int, members) -> None:
            if leads_group:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, sig)
            for member in members:
                with contextlib.suppress(psutil.Error):
                    member.send_signal(sig)

        send(signal.SIGTERM, family)
        _, alive = psutil.wait_procs(family, timeout=20)
        if alive:
            send(signal.SIGKILL, alive)
            psutil.wait_procs(alive, timeout=10)
