"""MLflow's scoring server for a model URI (``mlflow models serve --env-manager local``) on a free loopback
port: started, waited for on ``/ping``, and stopped with every process it started."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import psutil

from mnist_cnn.core.errors import ProjectError
from mnist_cnn.ops.net import answers_ok, free_port

HOST = "127.0.0.1"


class ScoringServerError(ProjectError, RuntimeError):
    """The scoring server exited or did not answer ``/ping`` in time."""


def _tail(log: Path, lines: int = 3) -> str:
    return " | ".join(log.read_text(errors="replace").strip().splitlines()[-lines:])


def stop(proc: subprocess.Popen, wait_s: float = 30.0) -> None:
    """Stop ``mlflow models serve`` and its uvicorn child. The child is stopped first so that the CLI,
    which waits on it, reaps it: stopping the CLI first would leave it an orphan."""
    with contextlib.suppress(psutil.NoSuchProcess):
        for child in psutil.Process(proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                child.terminate()
    try:
        proc.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=wait_s)


@contextlib.contextmanager
def scoring_server(
    model_uri: str,
    env: Mapping[str, str] | None = None,
    wait_s: float = 180.0,
    log: Path | None = None,
    workers: int = 1,
    mlserver: bool = False,
) -> Iterator[str]:
    """Serve ``model_uri`` with this interpreter's environment; yield its base URL (``http://127.0.0.1:PORT``).
    ``workers``: uvicorn's worker processes; ``mlserver``: MLServer instead of MLflow's own server."""
    port = free_port(HOST)
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local"]
    command += ["--host", HOST, "--port", str(port), "--workers", str(workers)]
    if mlserver:
        command.append("--enable-mlserver")
    env = dict(os.environ if env is None else env)
    # MLflow starts `uvicorn` by name: this interpreter's scripts must come first on PATH.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    url = f"http://{HOST}:{port}"
    with contextlib.ExitStack() as stack:
        if log is None:
            log = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "scoring-server.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        stack.callback(stop, proc)
        deadline = time.monotonic() + wait_s
        while True:
            if proc.poll() is not None:
                raise ScoringServerError(f"mlflow models serve exited with {proc.returncode}: {_tail(log)}")
            if answers_ok(f"{url}/ping"):
                break
            if time.monotonic() > deadline:
                raise ScoringServerError(f"mlflow models serve: no answer on {url}/ping within {wait_s:.0f} s")
            time.sleep(0.25)
        yield url
