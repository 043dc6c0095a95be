"""``mnist-cnn runs [--clean]``: the experiment's RUNNING runs, and which of them are stale.

A run is stale when the process that started it, on this machine and in this PID namespace, is gone
(``kill -9``, a crash, an OOM kill). A run whose owner cannot be proven to be this machine and namespace
(another host, a container or VM with the same host name, a run older than the boot id and namespace
tags) is listed as unknown and never touched.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import mlflow
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
    state: str  # alive | stale | unknown (owner not provably this machine and PID namespace)


def running(experiment: str, root: Path | None = None) -> list[RunState]:
    store.configure(root)
    states, local = [], store.is_local_store()
    for run in running_runs(_existing(experiment, root)):
        tags = run.data.tags
        stale = run_is_stale(tags, local)
        state = "unknown" if stale is None else ("stale" if stale else "alive")
        host, pid = tags.get(HOST_TAG, "?"), tags.get(PID_TAG, "?")
        states.append(RunState(run.info.run_id, run.info.run_name or "", host, pid, state))
    return states


def clean(experiment: str, root: Path | None = None) -> list[str]:
    """End the stale runs as KILLED; return their ids."""
    store.configure(root)
    return close_stale_runs(_existing(experiment, root))


def _existing(experiment: str, root: Path | None = None) -> list[str]:
    """The experiment's id. On a tracking server, only if it exists: the first user to create an
    experiment owns it, and a read-only command must not make that user. A local SQLite store has no
    owners: there it is created (with its artifacts beside the store), so that several ``mlflow run``
    started at once on a new store do not race in MLflow's own experiment creation."""
    if store.is_local_store():
        return [store.experiment_id(experiment, root)]
    found = mlflow.get_experiment_by_name(experiment)
    return [found.experiment_id] if found is not None else []


# Who owns a RUNNING run: a run whose process is gone is stale (closed KILLED by close_stale_runs).
HOST_TAG, PID_TAG, PID_START_TAG = "mnist_cnn.host", "mnist_cnn.pid", "mnist_cnn.pid_started"
# A host name is not a machine (containers and VM images share one) and a pid is only a pid in its PID
# namespace: the kernel's boot id tells machines (and boots) apart, the namespace tells containers of one
# kernel apart (the first namespace has the same number on every Linux machine, hence both).
BOOT_TAG, PID_NS_TAG = "mnist_cnn.boot_id", "mnist_cnn.pid_ns"
MACHINE_TAGS = (HOST_TAG, BOOT_TAG, PID_NS_TAG)


def _process_started(pid: int) -> str:
    return f"{psutil.Process(pid).create_time():.2f}"


def _boot_id() -> str | None:
    """This kernel's boot id; None where it cannot be read on Linux (no /proc): no run is then provably ours."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        pass
    if sys.platform.startswith("linux"):
        return None
    # macOS and the BSDs have no boot id: the boot time, to the second, is the best proof there is. It tells
    # two boots apart (pids are reused after a reboot) and two machines unless they booted the same second.
    return f"boot-time:{psutil.boot_time():.0f}"


def _pid_namespace() -> str | None:
    """This process's PID namespace, e.g. ``pid:[4026531836]``; ``none`` on a system without namespaces
    (macOS), None where Linux's /proc cannot be read."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None if sys.platform.startswith("linux") else "none"


def machine() -> dict[str, str | None]:
    """Where this process runs, as the owner tags name it: host, boot id, PID namespace."""
    return {HOST_TAG: socket.gethostname(), BOOT_TAG: _boot_id(), PID_NS_TAG: _pid_namespace()}


def owner_tags() -> dict[str, str]:
    """This process as the owner of a run: host, boot id, PID namespace, pid and the pid's start time
    (pids are reused). A part that cannot be read is left out: such a run can never be proven stale."""
    tags = {**machine(), PID_TAG: str(os.getpid()), PID_START_TAG: _process_started(os.getpid())}
    return {key: value for key, value in tags.items() if value is not None}


def is_this_machine(tags: Mapping[str, str]) -> bool:
    """Whether ``tags`` name this machine and this PID namespace, so that their pid is a pid here.
    Tags without the boot id or the namespace (runs of older versions) cannot be proven to."""
    here = machine()
    return None not in here.values() and all(tags.get(key) == here[key] for key in MACHINE_TAGS)


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
    """True if the run's process on this machine, in this PID namespace, is gone; None if that cannot be
    told (another host, machine or namespace, a run without those tags, a run this project did not start):
    such runs are never touched.

    ``mlflow run`` creates its run before building the environment; if that fails (no conda, no
    network) the project's code never ran and the run has no owner. On a local store (SQLite, this
    machine's alone) such a run is stale once no ``mlflow run`` is left on this host.
    """
    if HOST_TAG not in tags and tags.get("mlflow.source.type") == "PROJECT" and local_store:
        return not mlflow_run_alive(tags.get("mlflow.source.name"))
    if not is_this_machine(tags) or PID_TAG not in tags:
        return None
    try:
        started = _process_started(int(tags[PID_TAG]))
    except (psutil.NoSuchProcess, ValueError):
        return True
    except psutil.AccessDenied:
        return False  # a live process of another user
    return PID_START_TAG in tags and started != tags[PID_START_TAG]  # the pid was reused


def running_runs(experiment_ids: list[str]) -> list:
    if not experiment_ids:
        return []
    return MlflowClient().search_runs(experiment_ids, filter_string="attributes.status = 'RUNNING'", max_results=1000)


def close_stale_runs(experiment_ids: list[str], keep: str | None = None) -> list[str]:
    """End as KILLED the RUNNING runs whose process on this machine and PID namespace is gone; their ids."""
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
