"""The team server's faults, made for real: a port another web server holds, a recorded pid that is now
someone else's process, a short admin password, a start that fails, PostgreSQL stopped under a
running server, and add-user's duplicate and unusable names. One server (PostgreSQL and `mlflow
server`, started over a stale state) is shared by the tests that leave it as they found it."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import requests

from conftest import free_port
from mnist_cnn.cli import main
from mnist_cnn.ops import server
from mnist_cnn.ops.net import answers_ok, port_taken
from mnist_cnn.ops.server_state import STATE
from mnist_cnn.tracking.store import TrackingError, check_server
from team_helpers import ADMIN_PASSWORD, have_postgres

pytestmark = [
    pytest.mark.xdist_group("team-server-faults"),  # one worker: its tests share a module-scoped fixture
    pytest.mark.skipif(not have_postgres(), reason="PostgreSQL is not installed"),
    pytest.mark.skipif(
        os.geteuid() == 0 and shutil.which("runuser") is None, reason="as root, PostgreSQL needs runuser"
    ),
]

PASSWORD = "a-password-of-16"


def new_home() -> Path:
    """Outside pytest's tmp dir, whose parents are private (0700) to the postgres user."""
    home = Path(tempfile.mkdtemp(prefix="mnist-cnn-server-"))
    home.chmod(0o755)
    return home


@pytest.fixture
def home():
    """A server home of the test's own (``new_home``), removed after it."""
    made = new_home()
    yield made
    shutil.rmtree(made, ignore_errors=True)


def server_cli(monkeypatch, capsys, *argv: str, stdin: str = "") -> tuple[int, list[str], str]:
    """``python -m mnist_cnn server ARGV`` in this process: exit code, stdout lines, last stderr line."""
    capsys.readouterr()
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = main(["server", *argv])
    out, err = capsys.readouterr()
    return code, out.strip().splitlines(), (err.strip().splitlines() or [""])[-1]


def record_state(home: Path, pid: int, create_time: float, port: int, db_port: int) -> None:
    """A server.json as `start` writes it, for a server on ``port`` and ``db_port``, naming ``pid``."""
    state = {
        "host": "127.0.0.1",
        "port": port,
        "db_port": db_port,
        "allowed_hosts": None,
        "artifacts_destination": None,
        "pid": pid,
        "create_time": create_time,
        "backend_store_uri": f"postgresql://mlflow@127.0.0.1:{db_port}/mlflow",
    }
    (home / STATE).write_text(json.dumps(state))


def postgres_ctl(home: Path, *args: str) -> subprocess.CompletedProcess:
    """pg_ctl on ``home``'s PostgreSQL, as the postgres user when root (as the server runs it)."""
    pg_ctl = shutil.which("pg_ctl") or sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))[-1]
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    return subprocess.run([*prefix, str(pg_ctl), "-D", str(home / "pgdata"), *args], capture_output=True, text=True)


def processes_of(home: Path) -> list[psutil.Process]:
    """Live processes whose command line names ``home`` (PostgreSQL's ``-D``, the MLflow server's artifacts)."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        if process.info["status"] != psutil.STATUS_ZOMBIE and str(home) in " ".join(process.info["cmdline"] or []):
            found.append(process)
    return found


def wait_for(condition, seconds: float) -> bool:
    """Whether ``condition()`` came true within ``seconds``."""
    deadline = time.time() + seconds
    while not condition():
        if time.time() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.fixture
def strangers():
    """Start unrelated processes in sessions of their own (``start(*argv)``); each killed at the end."""
    started = []

    def start(*argv: str) -> subprocess.Popen:
        started.append(subprocess.Popen(argv, start_new_session=True))
        return started[-1]

    yield start
    for process in started:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def shared():
    """A server started through the command line with --allowed-hosts, over a server.json a crash left:
    its pid is now an unrelated `sleep` (the pid reused, so another start time)."""
    home, port, db_port = new_home(), free_port(), free_port()
    sleeper = subprocess.Popen(["sleep", "300"], start_new_session=True)
    record_state(home, sleeper.pid, psutil.Process(sleeper.pid).create_time() - 1000, port, db_port)
    hosts = f"mlflow.example.org,mlflow.example.org:{port}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", ADMIN_PASSWORD)
        try:
            argv = ["start", "--home", str(home), "--port", str(port), "--db-port", str(db_port)]
            started_at = time.time()
            assert main(["server", *argv, "--allowed-hosts", hosts]) == 0
            print(f"shared server started in {time.time() - started_at:.0f} s")
            yield SimpleNamespace(
                home=home, port=port, db_port=db_port, url=f"http://127.0.0.1:{port}", sleeper=sleeper
            )
        finally:
            main(["server", "stop", "--home", str(home)])
            sleeper.kill()
            sleeper.wait()
            shutil.rmtree(home, ignore_errors=True)


def test_start_over_a_stale_state_starts_a_new_server_and_spares_the_process_with_that_pid(shared):
    state = server.read_state(shared.home)
    assert state["pid"] != shared.sleeper.pid and shared.sleeper.poll() is None
    assert psutil.Process(state["pid"]).cmdline()[1:4] == ["-m", "mlflow", "server"]
    assert requests.get(f"{shared.url}/health", timeout=10).status_code == 200


def test_status_and_add_user_need_only_the_home_and_pass_the_allowed_hosts_check(shared, monkeypatch, capsys):
    home = str(shared.home)
    pid = server.read_state(shared.home)["pid"]
    assert server_cli(monkeypatch, capsys, "status", "--home", home) == (
        0,
        [f"postgresql: running on 127.0.0.1:{shared.db_port}", f"mlflow server: running (pid {pid}) at {shared.url}"],
        "",
    )
    assert server_cli(monkeypatch, capsys, "add-user", "alice", "--home", home, stdin=PASSWORD + "\n")[:2] == (
        0,
        ["user 'alice' created"],
    )
    search = f"{shared.url}/api/2.0/mlflow/experiments/search"
    for host, expected in ((f"mlflow.example.org:{shared.port}", 200), ("evil.example.org", 403)):
        answer = requests.get(search, params={"max_results": 1}, auth=("alice", PASSWORD), headers={"Host": host})
        assert answer.status_code == expected, host  # the names given still the only others allowed

    refused = {
        "alice": "error: user 'alice' already exists",
        "x" * 5000: f"error: user name '{'x' * 40}…' has 5000 characters; at most 255",
        "a:b": "error: user name 'a:b' contains ':': HTTP basic auth could never log it in",
    }
    for name, message in refused.items():
        assert server_cli(monkeypatch, capsys, "add-user", name, "--home", home, stdin=PASSWORD + "\n") == (
            1,
            [],
            message,
        )
    assert server_cli(monkeypatch, capsys, "add-user", "bob", "--home", home, stdin="short\n")[::2] == (
        1,
        "error: the password for 'bob' has 5 characters; MLflow requires at least 12",
    )
    get_user = f"{shared.url}/api/2.0/mlflow/users/get"
    for name in ("a:b", "bob"):  # refused before the server was asked
        assert requests.get(get_user, params={"username": name}, auth=("admin", ADMIN_PASSWORD)).status_code == 404


def test_options_that_contradict_the_running_server_are_refused(shared, monkeypatch, capsys):
    home, other = str(shared.home), str(free_port())
    pid = server.read_state(shared.home)["pid"]
    assert server_cli(monkeypatch, capsys, "status", "--home", home, "--port", other) == (
        1,
        [],
        f"error: --port {other}: the server of {home} was started with --port {shared.port} "
        f"({home}/server.json); leave --port out",
    )
    assert server_cli(monkeypatch, capsys, "start", "--home", home, "--port", other) == (
        1,
        [],
        f"error: the server of {home} already runs at {shared.url} (pid {pid}); "
        f"`server stop` first to start it with --port {other}",
    )
    assert server_cli(monkeypatch, capsys, "start", "--home", home) == (
        0,
        [f"MLflow server at {shared.url} (PostgreSQL on 127.0.0.1:{shared.db_port}, home {home})"],
        "",
    )
    assert server.read_state(shared.home)["pid"] == pid


def test_status_calls_a_server_without_its_database_degraded_and_start_brings_it_back(shared, monkeypatch, capsys):
    home = str(shared.home)
    pid = server.read_state(shared.home)["pid"]
    assert postgres_ctl(shared.home, "-m", "fast", "-w", "stop").returncode == 0
    try:
        assert server_cli(monkeypatch, capsys, "status", "--home", home)[:2] == (
            0,
            [
                "postgresql: stopped",
                f"mlflow server: degraded: pid {pid} at {shared.url} has no database (PostgreSQL is stopped); "
                "`server start` starts it again",
            ],
        )
        users = f"{shared.url}/api/2.0/mlflow/users/get"
        assert requests.get(users, params={"username": "admin"}, auth=("admin", ADMIN_PASSWORD)).status_code != 200
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
        with pytest.raises(TrackingError) as caught:  # what a training's first request hears
            check_server(shared.url)
        assert re.fullmatch(
            re.escape(f"tracking server {shared.url}: answers, but with HTTP ")
            + r"5\d\d"
            + re.escape(" (an error inside the server, e.g. its database is down); check the server's log"),
            str(caught.value),
        ), caught.value
    finally:
        assert server_cli(monkeypatch, capsys, "start", "--home", home)[0] == 0
    assert server_cli(monkeypatch, capsys, "status", "--home", home)[1][1] == (
        f"mlflow server: running (pid {pid}) at {shared.url}"
    )
    assert requests.get(users, params={"username": "admin"}, auth=("admin", ADMIN_PASSWORD)).status_code == 200


def test_start_refuses_a_port_another_web_server_holds_and_starts_nothing(strangers, home, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", ADMIN_PASSWORD)
    port = free_port()
    other = strangers(sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1")
    assert wait_for(lambda: port_taken("127.0.0.1", port), 30)
    code, out, err = server_cli(monkeypatch, capsys, "start", "--home", str(home), "--port", str(port))
    assert (code, out) == (1, [])
    assert err.startswith(f"error: 127.0.0.1:{port} is already taken by pid {other.pid} ({sys.executable} -m")
    assert err.endswith(": nothing started; choose another --port")
    assert not (home / "pgdata").exists() and not (home / STATE).exists()


def test_a_server_that_answers_health_is_not_ours_unless_our_process_listens(strangers, tmp_path):
    """The check after start: another web server answering /health on the port (one that took it after
    the check before start) does not make a server that never bound "up"."""
    (tmp_path / "health").write_text("OK")
    port = free_port()
    strangers(sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(tmp_path))
    assert wait_for(lambda: answers_ok(f"http://127.0.0.1:{port}/health"), 30)
    never_binds = strangers("sleep", "60")
    cfg = server.ServerConfig(home=tmp_path, port=port)
    with pytest.raises(server.ServerError, match=rf"did not answer on http://127.0.0.1:{port}/health within 3 s"):
        server._wait_until_up(cfg, never_binds, wait_s=3)


def test_stop_and_status_spare_processes_that_took_the_recorded_pid(strangers, home, monkeypatch, capsys):
    port, db_port = free_port(), free_port()
    uri = f"postgresql://mlflow@127.0.0.1:{db_port}/mlflow"
    # The very process a crash left recorded is gone, and its pid now a `sleep` (same start time:
    # only the command line tells); then one that looks like our server but started at another time.
    sleeper = strangers("sleep", "300")
    lookalike = strangers(
        sys.executable, "-c", "import time; time.sleep(300)",
        "-m", "mlflow", "server", "--backend-store-uri", uri, "--port", str(port),
    )  # fmt: skip
    for stranger, time_shift in ((sleeper, 0.0), (lookalike, -1000.0)):
        create_time = psutil.Process(stranger.pid).create_time() + time_shift
        record_state(home, stranger.pid, create_time, port, db_port)
        stale = f"stale: the recorded pid is now another process, pid {stranger.pid} ("
        code, out, _ = server_cli(monkeypatch, capsys, "status", "--home", str(home))
        assert code == 0 and out[0] == "postgresql: stopped" and out[1].startswith(f"mlflow server: {stale}")
        code, out, _ = server_cli(monkeypatch, capsys, "stop", "--home", str(home))
        assert code == 0 and out[0].startswith(f"MLflow server not signalled ({stale}")
        time.sleep(0.5)
        assert stranger.poll() is None, "stop signalled a process it did not start"
        assert "pid" not in server.read_state(home)  # forgotten: the next stop signals nothing either
    record_state(home, 0, 0.0, port, db_port)  # 0 would be "my process group" to kill()
    assert server_cli(monkeypatch, capsys, "stop", "--home", str(home)) == (
        1,
        [],
        f"error: {home}/server.json: pid = 0: expected a process id (an integer > 0)",
    )


def test_a_short_admin_password_is_refused_before_anything_starts(home, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "short")
    assert server_cli(monkeypatch, capsys, "start", "--home", str(home), "--port", str(free_port())) == (
        1,
        [],
        "error: MLFLOW_AUTH_ADMIN_PASSWORD has 5 characters; MLflow requires at least 12",
    )
    assert list(home.iterdir()) == []


def test_a_start_that_fails_stops_the_postgresql_it_started(home, monkeypatch, capsys):
    # MLflow itself refuses the admin password older versions shipped (and exits at once).
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "password1234")
    argv = ["--home", str(home), "--port", str(free_port()), "--db-port", str(free_port())]
    code, out, err = server_cli(monkeypatch, capsys, "start", *argv)
    assert (code, out) == (1, [])
    assert err.startswith("error: mlflow server exited with ") and "insecure default password" in err, err
    assert (home / "pgdata" / "PG_VERSION").exists()  # it got that far
    assert postgres_ctl(home, "status").returncode != 0
    assert processes_of(home) == []
    assert "pid" not in server.read_state(home)
    assert server_cli(monkeypatch, capsys, "status", "--home", str(home))[1] == [
        "postgresql: stopped",
        "mlflow server: stopped",
    ]
