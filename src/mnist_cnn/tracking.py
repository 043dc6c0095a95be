"""MLflow: one run per training, shared by the train and evaluate stages; a champion alias in the registry.

Every stage reaches MLflow through this module, so the store, the run and the names are decided here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import socket
import subprocess
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mlflow
import psutil
from filelock import FileLock
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from . import distributed, runmeta
from .config import parse_value
from .errors import masked, one_line, without_driver_prefix

log = logging.getLogger(__name__)

CHAMPION = "champion"
STORE_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
# Who owns a RUNNING run: a run whose process is gone is stale (closed KILLED by close_stale_runs).
HOST_TAG, PID_TAG, PID_START_TAG = "mnist_cnn.host", "mnist_cnn.pid", "mnist_cnn.pid_started"
# MLflow retries an unreachable server for minutes by default (7 retries, backoff factor 2, 120 s
# timeout); bounded here unless the user set them. The pre-flight check below fails in seconds.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
PREFLIGHT_TIMEOUT_S = 5.0


class TrackingError(RuntimeError):
    """The tracking server cannot be reached or refuses this client."""


def project_root(cwd: Path | None = None) -> Path:
    """The project directory; inside ``dvc exp run --temp`` (``<root>/.dvc/tmp/exps/...``) the real one."""
    cwd = (cwd or Path.cwd()).resolve()
    parts = cwd.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return cwd


def tracking_uri(root: Path | None = None) -> str:
    """``$MLFLOW_TRACKING_URI`` if set (relative SQLite paths made absolute), else ``<root>/mlflow.db``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        return f"sqlite:///{(root or project_root()) / STORE_FILE}"
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not Path(uri[len(prefix) :]).is_absolute():
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


_checked: set[str] = set()


def configure(root: Path | None = None) -> str:
    """Point MLflow at the store; check it once per process, so a dead server fails in seconds."""
    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if uri not in _checked:
        if uri.startswith(("http://", "https://")):
            for name, value in HTTP_DEFAULTS.items():
                os.environ.setdefault(name, value)
            check_server(uri)
        elif uri.startswith("sqlite:"):
            create_store(uri)
        _checked.add(uri)
    return uri


def sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def store_lock(uri: str | None = None) -> contextlib.AbstractContextManager:
    """A lock every process on this machine shares for a SQLite store (a file beside it); for a
    server, a lock every client shares, held in the server's registry (``registry_lock``)."""
    uri = uri or mlflow.get_tracking_uri()
    path = sqlite_path(uri)
    if path is None:
        return registry_lock() if uri.startswith(("http://", "https://")) else contextlib.nullcontext()
    check_store_path(path, uri)
    path.parent.mkdir(parents=True, exist_ok=True)  # a new store in a new folder is fine
    return FileLock(str(path) + ".lock", timeout=300)


def check_store_path(path: Path, uri: str) -> None:
    """Said before MLflow opens it: given a directory, its engine retries for about two minutes, and
    a file where a folder should be ends in a raw ``File exists``."""
    if path.is_dir():
        raise TrackingError(f"MLflow store {uri}: {path} is a directory, not a SQLite file; check MLFLOW_TRACKING_URI")
    for level in (path, *path.parents):  # the first that exists decides
        if level.is_symlink() and not level.exists():
            raise TrackingError(f"MLflow store {uri}: {level} is a broken link; check MLFLOW_TRACKING_URI")
        if level.exists():
            if level != path and not level.is_dir():
                raise TrackingError(
                    f"MLflow store {uri}: {level} is a file, not a directory; check MLFLOW_TRACKING_URI"
                )
            return


LOCK_MODEL = "mnist-cnn.promotion-lock"


@contextlib.contextmanager
def registry_lock(wait_s: float = 300.0, stale_s: float = 120.0) -> Iterator[None]:
    """A mutex for clients of one tracking server, on a machine each: creating a registered model is
    atomic on the server (names are unique), so whoever creates ``LOCK_MODEL`` holds the lock and
    deletes it to release. One older than ``stale_s`` (its holder died) is broken."""
    client = MlflowClient()
    deadline = time.time() + wait_s
    while True:
        try:
            client.create_registered_model(LOCK_MODEL, description="held while a champion alias moves")
            break
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        with contextlib.suppress(MlflowException):
            held = client.get_registered_model(LOCK_MODEL)
            if time.time() - held.creation_timestamp / 1000 > stale_s:
                client.delete_registered_model(LOCK_MODEL)
                continue
        if time.time() > deadline:
            raise TrackingError(f"registered model {LOCK_MODEL!r} held for over {wait_s:.0f} s; delete it if stale")
        time.sleep(0.2 + random.random() * 0.3)
    try:
        yield
    finally:
        with contextlib.suppress(MlflowException):
            client.delete_registered_model(LOCK_MODEL)


def create_store(uri: str) -> None:
    """Create (or migrate) the SQLite store's tables under the lock: processes that open a new store at
    once otherwise race in MLflow's schema creation (``duplicate column name: step``)."""
    from sqlalchemy.exc import SQLAlchemyError

    with store_lock(uri):
        try:
            client = MlflowClient(uri, uri)  # opens the database (and creates its tables) right here
            client.search_experiments(max_results=1)
            client.search_registered_models(max_results=1)
        except (SQLAlchemyError, MlflowException) as exc:  # not a database, a directory, no permission
            reason = without_driver_prefix(one_line(exc))
            raise TrackingError(f"MLflow store {uri}: cannot be opened ({reason}); check MLFLOW_TRACKING_URI") from None


# The body of every 403 from MLflow's auth app (Flask and FastAPI routes alike).
MLFLOW_FORBIDDEN = "Permission denied"


def check_server(uri: str, timeout: float = PREFLIGHT_TIMEOUT_S) -> None:
    """One request, no retries: raise a one-line ``TrackingError`` if the server is down or refuses us."""
    import requests
    from mlflow.tracking._tracking_service.utils import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    server = f"tracking server {masked(uri)}"  # never print a password from the URI
    try:
        response = http_request(
            get_default_host_creds(uri),
            "/api/2.0/mlflow/experiments/get-by-name",
            "GET",
            max_retries=0,
            timeout=timeout,
            params={"experiment_name": "Default"},
        )
    except (requests.exceptions.RequestException, MlflowException, OSError) as exc:
        reason = masked(one_line(exc))  # MLflow's text repeats the URL, password included
        if "Connection refused" in reason:
            reason = "connection refused"
        elif "timed out" in reason.lower() or "timeout" in reason.lower():
            reason = f"no answer in {timeout:.0f} s"
        raise TrackingError(f"{server}: unreachable ({reason}); check MLFLOW_TRACKING_URI") from None
    if response.status_code == 401:
        raise TrackingError(
            f"{server}: refused the login (HTTP 401); set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
        )
    kind = response.headers.get("Content-Type", "").split(";")[0].strip().lower()  # media types ignore case
    if response.status_code == 403:
        if response.text.strip() == MLFLOW_FORBIDDEN:
            # The login is good; MLflow's auth only withholds experiment "Default", the probe (under a
            # NO_PERMISSIONS default, a user sees the experiments they were given or created). Each call
            # on an experiment of theirs is checked by the server itself.
            return
        said = masked(one_line(response.text))[:80]
        raise TrackingError(
            f"{server}: refused (HTTP 403, {kind or 'no content type'}: {said!r}), not by MLflow's permission"
            " check; check MLFLOW_TRACKING_URI, the server's --allowed-hosts and any proxy in front of it"
        )
    if response.status_code >= 500:
        raise TrackingError(f"{server}: answered HTTP {response.status_code}; check the server's log")
    if kind != "application/json":  # MLflow answers JSON, errors included; this is some other web server
        raise TrackingError(
            f"{server}: not an MLflow tracking server (HTTP {response.status_code},"
            f" {kind or 'no content type'}); check MLFLOW_TRACKING_URI"
        )


def experiment_id(name: str, root: Path | None = None) -> str:
    """The id of experiment ``name``, created with artifacts beside the store if it is new."""
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifacts = None
    if mlflow.get_tracking_uri().startswith("sqlite:"):
        artifacts = ((root or project_root()) / ARTIFACTS_DIR).as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=artifacts)
    except MlflowException:  # created meanwhile by a parallel run
        return mlflow.get_experiment_by_name(name).experiment_id


def git_lineage(root: Path) -> dict[str, str]:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": "unknown", "git_dirty": "unknown"}
    return {"git_commit": commit, "git_dirty": str(dirty).lower()}


def log_params_once(params: Mapping[str, Any]) -> None:
    """Log params to the active run, skipping keys it already holds (e.g. logged by ``mlflow run -P``).

    MLflow refuses to change a logged value; a key already there with another value is reported,
    not raised, since the run's own value is what that run used.
    """
    run = mlflow.active_run()
    existing = MlflowClient().get_run(run.info.run_id).data.params
    new = {}
    for key, value in params.items():
        if key not in existing:
            new[key] = value
        elif parse_value(existing[key]) != value and existing[key] != str(value):
            log.warning(
                "param %s already logged as %r in run %s; not changed to %r",
                key,
                existing[key],
                run.info.run_id,
                value,
            )
    if new:
        mlflow.log_params(new, synchronous=True)


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


def is_local_store() -> bool:
    """A SQLite file: only processes of this machine write to it."""
    return sqlite_path(mlflow.get_tracking_uri()) is not None


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP (one ignored, as under nohup, stays ignored) until the block is done:
    a second Ctrl-C, or the hang-up a torchrun agent passes on after the terminal's, must not break off
    ending a run.

    Held by a handler that notes them, not by blocking them (``pthread_sigmask``): a main thread that
    blocks them makes the kernel hand them to MLflow's logging threads instead, and ending the run then
    hung at times joining its async-logging thread. The first one held is raised again on leaving.
    """
    held: list[int] = []
    stops = [signal.SIGINT, *distributed.stop_signals()]
    previous = {sig: signal.signal(sig, lambda signum, frame: held.append(signum)) for sig in stops}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if held:
            signal.raise_signal(held[0])


def _end(status: str) -> None:
    with signals_deferred():
        try:
            mlflow.flush_async_logging()
        finally:
            mlflow.end_run(status)


def _name_project_run(run_id: str, name: str | None) -> None:
    """Name a run that ``mlflow run`` created (MLflow gave it a random name) and tag how it was
    launched, once: the first stage to reach it names it, later stages and resumed runs keep that."""
    client = MlflowClient()
    tags = client.get_run(run_id).data.tags
    if runmeta.LAUNCH_TAG in tags:
        return
    if name:
        client.update_run(run_id, name=name)
    client.set_tag(run_id, runmeta.LAUNCH_TAG, runmeta.launcher(source_type=tags.get("mlflow.source.type")))


@contextlib.contextmanager
def run(
    experiment: str,
    run_id: str | None = None,
    root: Path | None = None,
    *,
    name: str | None = None,
    system_metrics: bool = False,
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    ended_as: Mapping[type[BaseException], str] | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Start (or, with ``run_id`` / ``$MLFLOW_RUN_ID``, reopen) a run; end it FINISHED, FAILED or KILLED.

    A new run is called ``name`` and tagged with how it was launched (``runmeta.launcher``); so is a
    run ``mlflow run`` made. With ``system_metrics``, MLflow samples CPU, memory (and NVIDIA GPUs)
    into ``system/*`` metrics while the run is open.

    SIGTERM is turned into an interrupt for the duration, so a killed stage ends its run KILLED
    rather than leaving it RUNNING; interrupts that arrive while the run is being ended wait for it.
    Runs of this experiment left RUNNING by dead processes of this host are closed first.
    A new run can be nested under ``parent_run_id``; ``ended_as`` maps exceptions that are not failures
    (a pruned Optuna trial) to the status they end the run with (they are re-raised all the same).
    """
    configure(root)
    # A trial nested under a study's parent is a run of its own, never the one `mlflow run` made.
    project_run = None if parent_run_id else os.environ.get("MLFLOW_RUN_ID")
    run_id = project_run or run_id
    exp_id = experiment_id(experiment, root)
    close_stale_runs([exp_id], keep=run_id)
    # A new run carries its owner from its first moment: an interrupt cannot leave it ownerless.
    if run_id:
        kwargs = {"run_id": run_id}
    else:
        tags = {**(tags or {}), **owner_tags(), runmeta.LAUNCH_TAG: runmeta.launcher()}
        kwargs = {"experiment_id": exp_id, "run_name": name, "tags": tags, "parent_run_id": parent_run_id}
    with distributed.stop_signals_interrupt():
        # None, not False, without system_metrics: MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING still applies.
        # Started with SIGINT/SIGTERM held, so that a run is never left half-started (its system-metrics
        # thread running): an interrupt held meanwhile is raised on leaving that block, inside the try,
        # so the run ends KILLED.
        status = "FAILED"
        try:
            with signals_deferred():
                active = mlflow.start_run(**kwargs, log_system_metrics=True if system_metrics else None)
            if run_id:  # a reopened run changes owner; a new one got its owner at creation
                mlflow.set_tags(owner_tags())
            if project_run:
                _name_project_run(project_run, name)
            yield active
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        except BaseException as exc:
            status = next((s for kind, s in (ended_as or {}).items() if isinstance(exc, kind)), "FAILED")
            raise
        finally:
            _end(status)


@contextlib.contextmanager
def reopen(run_id: str, stage: str, root: Path | None = None, name: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """Log into a finished run without rewriting its history: the run's status stays what training
    made it, and this stage's outcome is the tag ``<stage>.status`` (FINISHED, FAILED or KILLED, with
    ``<stage>.error``). A run ``mlflow run`` made for this stage alone is called ``name``."""
    configure(root)
    project_run = os.environ.get("MLFLOW_RUN_ID")
    run_id = project_run or run_id
    try:
        was = MlflowClient().get_run(run_id).info.status
    except MlflowException:
        raise TrackingError(
            f"run {run_id} (from models/train.json) is not in the store {mlflow.get_tracking_uri()}; "
            "rerun the train stage"
        ) from None
    # A run still RUNNING is one `mlflow run` started for train and evaluate together.
    final = was if RunStatus.is_terminated(RunStatus.from_string(was)) else None
    with distributed.stop_signals_interrupt():
        active = mlflow.start_run(run_id=run_id)
        outcome, error = "FAILED", None
        try:
            mlflow.set_tag(f"{stage}.status", "RUNNING")
            if project_run:
                _name_project_run(project_run, name)
            yield active
            outcome = "FINISHED"
        except KeyboardInterrupt:
            outcome = "KILLED"
            raise
        except Exception as exc:
            error = one_line(exc)
            raise
        finally:
            with signals_deferred():
                mlflow.set_tags({f"{stage}.status": outcome, **({f"{stage}.error": error[:5000]} if error else {})})
            _end(final or outcome)


def run_exists(run_id: str, root: Path | None = None) -> bool:
    """Whether ``run_id`` is in the store and not deleted (a deleted run cannot be reopened)."""
    configure(root)
    try:
        return MlflowClient().get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException:
        return False


def describe_active_run() -> None:
    """Write the run's description (the paragraph the MLflow UI shows first) from what the run holds."""
    run = MlflowClient().get_run(mlflow.active_run().info.run_id)
    facts = {**run.data.params, **run.data.metrics, **run.data.tags}
    mlflow.set_tag(runmeta.DESCRIPTION_TAG, runmeta.description(facts))


# What every split holds: the IDX arrays as read (uint8 images, uint8 labels).
DATASET_SCHEMA_SPECS = (("images", "uint8", (-1, 28, 28)), ("labels", "uint8", (-1,)))


def log_datasets(name: str, source: str, digests: Mapping[str, str]) -> None:
    """Record the data in MLflow's dataset tracking (the runs table's Datasets column): one entry per
    ``{context: digest}``, e.g. ``training``. Metadata only: the digests come from the files' MD5s,
    which the stage computed anyway, so nothing is hashed or copied again."""
    import numpy as np
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types import Schema, TensorSpec

    schema = Schema([TensorSpec(np.dtype(dtype), shape, spec) for spec, dtype, shape in DATASET_SCHEMA_SPECS])
    with warnings.catch_warnings():
        # MLflow registers its local-file source twice and warns that a path "can be interpreted in
        # multiple ways", both of them the same class.
        warnings.filterwarnings("ignore", "The specified dataset source can be interpreted", UserWarning)
        found = resolve_dataset_source(source)
    datasets = [MetaDataset(found, name=name, digest=digest, schema=schema) for digest in digests.values()]
    mlflow.log_inputs(datasets, contexts=list(digests), tags_list=[None] * len(datasets))


def log_missing_epochs(history: list[Mapping[str, Any]]) -> None:
    """Log the per-epoch metrics of ``history`` (dicts of EpochStats) the active run does not hold yet."""
    run_id = mlflow.active_run().info.run_id
    logged = {m.step for m in MlflowClient().get_metric_history(run_id, "val_loss")}
    logger = EpochLogger()
    for epoch in history:
        if epoch["epoch"] not in logged:
            logger.log_epoch(SimpleNamespace(**epoch))


def version_with_tag(model_name: str, key: str, value: str) -> str | None:
    """The version of ``model_name`` tagged ``key=value``, if any."""
    try:
        versions = MlflowClient().search_model_versions(f"name = '{model_name}' and tags.{key} = '{value}'")
    except MlflowException:
        return None
    return str(versions[0].version) if versions else None


class EpochLogger:
    """The train loop's reporter: per-epoch metrics with ``step=epoch``, logged asynchronously."""

    def log_epoch(self, stats) -> None:
        mlflow.log_metrics(
            {
                "train_loss": stats.train_loss,
                "train_acc": stats.train_acc,
                "val_loss": stats.val_loss,
                "val_acc": stats.val_acc,
                "lr": stats.lr,
                "epoch_seconds": stats.epoch_seconds,
            },
            step=stats.epoch,
            synchronous=False,
        )


def champion_accuracy(client: MlflowClient, model_name: str) -> tuple[str | None, float | None]:
    """(version, test accuracy) of the current champion, or (None, None) if there is none."""
    try:
        version = client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        return None, None
    accuracy = version.tags.get("test_acc")
    if accuracy is None:
        accuracy = client.get_run(version.run_id).data.metrics.get("test_acc")
    return version.version, None if accuracy is None else float(accuracy)


def promote_if_better(model_name: str, version: str, test_acc: float) -> bool:
    """Tag ``version`` with its test accuracy; move ``champion`` to it if it beats the current champion.

    Read-compare-write under the store's lock, so parallel evaluations cannot both win.
    """
    client = MlflowClient()
    client.set_model_version_tag(model_name, version, "test_acc", f"{test_acc:.4f}")
    with store_lock():
        return _promote(client, model_name, version, test_acc)


def _promote(client: MlflowClient, model_name: str, version: str, test_acc: float) -> bool:
    current, current_acc = champion_accuracy(client, model_name)
    if current is not None and current_acc is not None and test_acc <= current_acc:
        log.info(
            "%s v%s: test acc %.2f%% does not beat champion v%s (%.2f%%); alias unchanged",
            model_name,
            version,
            test_acc,
            current,
            current_acc,
        )
        return False
    client.set_registered_model_alias(model_name, CHAMPION, version)
    log.info("%s v%s is now @%s (test acc %.2f%%)", model_name, version, CHAMPION, test_acc)
    return True
