"""The MLflow UI as a person sees it: a throwaway ``mlflow server`` on a store, headless Chromium on it.

Used by ``scripts/ui_screenshot.py`` and ``tests/test_ui.py``. Playwright is a dev dependency, imported
only here and only when a browser is asked for. MLflow 3.17 opens on its GenAI view; the pages below are
the classic ones, addressed directly.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

from mnist_cnn.ops.net import free_port, is_healthy

CHROMIUM_ENV = "CHROMIUM"  # a Chromium binary other than the system's
# Headless in a container: no sandbox (we run as root), no GPU, nothing fetched in the background.
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
)
VIEWPORT = {"width": 1280, "height": 800}


def chromium_path() -> str | None:
    """``$CHROMIUM``, else ``chromium`` (Debian's package) or ``chromium-browser`` on PATH."""
    named = os.environ.get(CHROMIUM_ENV)
    if named:
        return named if Path(named).is_file() else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


def runs_url(base: str, experiment_id: str) -> str:
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def run_url(base: str, experiment_id: str, run_id: str, tab: str = "") -> str:
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}" + (f"/{tab}" if tab else "")


def metric_url(base: str, experiment_id: str, run_id: str, metric: str) -> str:
    """The metric page: one run's curve, points shown, step on the x axis."""
    query = (
        f'runs=["{run_id}"]&metric="{metric}"&experiments=["{experiment_id}"]'
        f'&plot_metric_keys=["{metric}"]&show_point=true&x_axis=step'
    )
    return f"{base}/#/metric?{quote(query, safe='=&')}"


def model_url(base: str, name: str) -> str:
    return f"{base}/#/models/{quote(name)}"


@contextlib.contextmanager
def mlflow_server(store_uri: str, log: Path, wait_s: float = 120.0) -> Iterator[str]:
    """The UI of ``store_uri`` as users start it, ``python -m mnist_cnn ui``, at a free port of 127.0.0.1,
    started in the log's directory (not the store's); yield its URL, stop it after.

    Runs keep their own artifact locations (``file://`` beside a SQLite store), which the server reads.
    """
    port = free_port()
    args = [sys.executable, "-m", "mnist_cnn", "ui", "--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": store_uri}
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            args, cwd=log.parent, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
    try:
        deadline = time.monotonic() + wait_s
        while not is_healthy(url):
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {proc.returncode}; see {log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server not up after {wait_s:.0f} s; see {log}")
            time.sleep(0.3)
        yield url
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (uvicorn's worker included), SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, 15)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        proc.wait(timeout=15)


@contextlib.contextmanager
def browser_page(executable: str | None = None) -> Iterator[Any]:
    """A Playwright page in headless Chromium with a fresh profile, 1280x800; closed after."""
    from playwright.sync_api import sync_playwright

    executable = executable or chromium_path()
    if executable is None:
        raise RuntimeError(f"no Chromium found (install the chromium package or set ${CHROMIUM_ENV})")
    with tempfile.TemporaryDirectory(prefix="mnist-cnn-chromium-") as profile, sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            profile,
            executable_path=executable,
            headless=True,
            args=list(CHROMIUM_ARGS),
            viewport=VIEWPORT,
            accept_downloads=True,
        )
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


def close_assistant(page: Any) -> None:
    """MLflow 3.17 opens its assistant panel over a third of the page; close it if it is there."""
    button = page.get_by_role("button", name="Close")
    with contextlib.suppress(Exception):
        if button.count():
            button.first.click(timeout=2000)
