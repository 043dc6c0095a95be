"""``mnist-cnn runs [--clean]``: the experiment's RUNNING runs, and which of them are stale.

A run is stale when the process that started it, on this host, is gone (``kill -9``, a crash, an OOM
kill). Runs of other hosts on a shared server are listed but never touched.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil
from mlflow.tracking import MlflowClient

from mnist_cnn.tracking import store
from mnist_cnn.tracking.store import is_local_store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunState:
    run_id: str
    name: str
    host: str
    pid: str
    state: str  # alive | stale | unknown (another host, or not started by this project)


def running(experiment: str, root: Path | None = None) -> list[RunState]:
    store.configure(root)
    states, local = [], store.is_local_store()
    for run in running_runs([store.experiment_id(experiment, root)]):
        tags = run.data.tags
        stale = run_is_stale(tags, local)
        state = "unknown" if stale is None else ("stale" if stale else "alive")
        host, pid = tags.get(HOST_TAG, "?"), tags.get(PID_TAG, "?")
        states.append(RunState(run.info.run_id, run.info.run_name or "", host, pid, state))
    return states


def clean(experiment: str, root: Path | None = None) -> list[str]:
    """End the stale runs as KILLED; return their ids."""
    store.configure(root)
    return close_stale_runs([store.experiment_id(experiment, root)])


# Who owns a RUNNING run: a run whose process is gone is stale (closed KILLED by close_stale_runs).
HOST_TAG, PID_TAG, PID_START_TAG = "mnist_cnn.host", "mnist_cnn.pid", "mnist_cnn.pid_started"


def _process_started(pid: int) -> str:
    return f"{psutil.Process(pid).create_time():.2f}"


def owner_tags() -> dict[str, str]:
    """This process as the owner of a run: host, pid and the pid's start time (pids are reused)."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()), PID_START_TAG: _process_started(os.getpid())}


def _local_path(source: str) -> Path | None:
    """The directory of a project source such as ``/path`` or ``file:///path#subdir``; None for a remote."""
    path, _, subdir = source.removeprefix("file://").partition("#")
    if "://" in path or not path:
        return None
    return (Path(path) / subdir).resolve()


def mlflow_run_alive(source: str | None = None) -> bool:
    """Whether an ``mlflow run`` (the CLI that creates a run, then the project's environment) of the
    project at ``source`` runs on this host; of any project when ``source`` is not a local directory."""
    project = _local_path(source) if source else None
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        args = proc.info["cmdline"] or []
        names = [Path(arg).name for arg in args[:4]]
        at = next((i for i in range(len(names) - 1) if names[i] == "mlflow" and names[i + 1] == "run"), None)
        if at is None:
            continue
        if project is None or proc.info["cwd"] is None:
            return True
        cwd = Path(proc.info["cwd"])
        if any((cwd / arg).resolve() == project for arg in [".", *args[at + 2 :]] if not arg.startswith("-")):
            return True
    return False


def run_is_stale(tags: Mapping[str, str], local_store: bool = False) -> bool | None:
    """True if the run's process on this host is gone; None if that cannot be told (another host, or a
    run this project did not start): such runs are never touched.

    ``mlflow run`` creates its run before building the environment; if that fails (no conda, no
    network) the project's code never ran and the run has no owner. On a local store (SQLite, this
    machine's alone) such a run is stale once no ``mlflow run`` is left on this host.
    """
    if HOST_TAG not in tags and tags.get("mlflow.source.type") == "PROJECT" and local_store:
        return not mlflow_run_alive(tags.get("mlflow.source.name"))
    if tags.get(HOST_TAG) != socket.gethostname() or PID_TAG not in tags:
        return None
    try:
        started = _process_started(int(tags[PID_TAG]))
    except (psutil.NoSuchProcess, ValueError):
        return True
    except psutil.AccessDenied:
        return False  # a live process of another user
    return PID_START_TAG in tags and started != tags[PID_START_TAG]  # the pid was reused


def running_runs(experiment_ids: list[str]) -> list:
    return MlflowClient().search_runs(experiment_ids, filter_string="attributes.status = 'RUNNING'", max_results=1000)


def close_stale_runs(experiment_ids: list[str], keep: str | None = None) -> list[str]:
    """End as KILLED the RUNNING runs whose process on this host is gone; return their ids."""
    client, closed = MlflowClient(), []
    local = is_local_store()
    for stale in running_runs(experiment_ids):
        if stale.info.run_id == keep or not run_is_stale(stale.data.tags, local):
            continue
        pid = stale.data.tags.get(PID_TAG)
        why = f"process {pid} on this host is gone" if pid else "mlflow run never reached the project's code"
        client.set_tag(stale.info.run_id, "mnist_cnn.closed", f"stale: {why}")
        client.set_terminated(stale.info.run_id, "KILLED")
        log.warning("run %s was left RUNNING (%s): ended KILLED", stale.info.run_id, why)
        closed.append(stale.info.run_id)
    return closed
