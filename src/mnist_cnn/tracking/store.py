"""MLflow: one run per training, shared by the train and evaluate stages; a champion alias in the registry.

Every stage reaches MLflow through this module, so the store, the run and the names are decided here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from pathlib import Path

import mlflow
from filelock import FileLock
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mnist_cnn.core.errors import ProjectError, masked, one_line, without_driver_prefix
from mnist_cnn.ops.lock import NamedLock

STORE_FILE = "mlflow.db"


ARTIFACTS_DIR = "mlartifacts"


# MLflow retries an unreachable server for minutes by default (7 retries, backoff factor 2, 120 s
# timeout); bounded here unless the user set them. The pre-flight check below fails in seconds.
# Artifacts go through the team server: MLflow 3's client otherwise downloads every artifact (and
# uploads those over 500 MB) straight from the server's bucket, with URLs the server presigns for its own
# S3 endpoint, which a client on another machine may not reach, and a client holds no key for.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false",
    "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD": "false",
}


# A dead server refuses at once; a live one can be slow on its first request after a start (it opens its
# database and loads its routes), so the check waits as long as any other request would.
PREFLIGHT_TIMEOUT_S = float(HTTP_DEFAULTS["MLFLOW_HTTP_REQUEST_TIMEOUT"])


class TrackingError(ProjectError, RuntimeError):
    """The tracking server cannot be reached or refuses this client."""


class ServerUnreachable(TrackingError):
    """Nothing answered at the server's address; ``reason`` says how (refused, no answer in time)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


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


_checked: set[tuple] = set()


def _identity(uri: str) -> tuple:
    """The store and who logs in to it: a login checked once is not taken for another one's."""
    login = (os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD"))
    return (uri, hash(login))


def configure(root: Path | None = None) -> str:
    """Point MLflow at the store; check it once per process (and login), so a dead server fails in seconds."""
    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if _identity(uri) not in _checked:
        if uri.startswith(("http://", "https://")):
            for name, value in HTTP_DEFAULTS.items():
                os.environ.setdefault(name, value)
            # urllib3 warns at each retry, 250 characters a line; a request that fails for good is
            # reported once, by the stage (runs.ServerLost).
            logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
            check_server(uri)
        elif uri.startswith("sqlite:"):
            create_store(uri)
        _checked.add(_identity(uri))
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


class RegisteredModelLockBackend:
    """``NamedLock``'s record on a tracking server: the registered model ``name``. Creating one is atomic
    on the server (names are unique); its creation time says how long it has been held."""

    def __init__(self, name: str = LOCK_MODEL) -> None:
        self.client, self.name = MlflowClient(), name

    def try_create(self) -> bool:
        try:
            self.client.create_registered_model(self.name, description="held while a champion alias moves")
            return True
        except MlflowException as exc:
            # RESOURCE_DOES_NOT_EXIST: seen once (three `all`s on a team server) while the holder released
            # it; not acquired, so NamedLock looks again (at worst it waits for its own lock to go stale).
            if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise
            return False

    def age_s(self) -> float | None:
        try:
            return time.time() - self.client.get_registered_model(self.name).creation_timestamp / 1000
        except MlflowException:  # released meanwhile
            return None

    def delete(self) -> None:
        with contextlib.suppress(MlflowException):
            self.client.delete_registered_model(self.name)


def registry_lock(wait_s: float = 300.0, stale_s: float = 120.0) -> NamedLock:
    """A mutex for clients of one tracking server, on a machine each: the registered model ``LOCK_MODEL``,
    held while it exists; one older than ``stale_s`` (its holder died) is broken."""
    backend = RegisteredModelLockBackend()
    return NamedLock(backend, f"registered model {LOCK_MODEL!r}", wait_s, stale_s, error=TrackingError)


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


def check_server(uri: str, timeout: float | None = None) -> None:
    """One request, no retries: raise a one-line ``TrackingError`` if the server is down or refuses us
    (``ServerUnreachable`` if nothing answered at all)."""
    import requests
    from mlflow.tracking._tracking_service.utils import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    server = f"tracking server {masked(uri)}"  # never print a password from the URI
    timeout = timeout or request_timeout()
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
        said = re.search(r"too many (\d{3}) error responses", str(exc))
        if said:  # urllib3 gives up on a retryable status (500, 503, ...) without the response
            raise server_error(server, int(said.group(1))) from None
        reason = unreachable_reason(exc, timeout)
        if reason.startswith("no answer"):  # something holds the port: not a wrong address
            raise ServerUnreachable(
                f"{server}: accepted the connection but sent {reason} (starting, overloaded, or waiting"
                " for its database); check the server's log, or wait longer with MLFLOW_HTTP_REQUEST_TIMEOUT",
                reason,
            ) from None
        raise ServerUnreachable(f"{server}: unreachable ({reason}); check MLFLOW_TRACKING_URI", reason) from None
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
        raise server_error(server, response.status_code)
    if kind != "application/json":  # MLflow answers JSON, errors included; this is some other web server
        raise TrackingError(
            f"{server}: not an MLflow tracking server (HTTP {response.status_code},"
            f" {kind or 'no content type'}); check MLFLOW_TRACKING_URI"
        )


def request_timeout() -> float:
    """Seconds MLflow waits for an answer: ``MLFLOW_HTTP_REQUEST_TIMEOUT``, else the project's default."""
    return float(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT") or PREFLIGHT_TIMEOUT_S)


def server_error(server: str, status: int) -> TrackingError:
    return TrackingError(
        f"{server}: answers, but with HTTP {status} (an error inside the server, e.g. its database is down);"
        " check the server's log"
    )


class ArtifactsNotStored(TrackingError):
    """The tracking server answers, but failed every try to store an artifact: its artifact storage (the
    bucket or disk behind ``--artifacts-destination``) is down or refuses it."""


# How MLflow's client reports an artifact upload the server failed with 5xx on every retry.
_ARTIFACT_5XX = re.compile(
    r"API request to \S+/api/2\.0/mlflow-artifacts/artifacts/(?P<path>\S+) failed with exception .*"
    r"too many (?P<status>5\d\d) error responses"
)


def artifacts_not_stored(exc: BaseException, run_id: str, outcome: str) -> ArtifactsNotStored | None:
    """``exc`` as one line, if it is the server failing every try to store an artifact of ``run_id``
    (``outcome``: what that left of the run); None for any other failure."""
    match = _ARTIFACT_5XX.search(str(exc)) if isinstance(exc, MlflowException) else None
    if match is None:
        return None
    name = match["path"].rsplit("/artifacts/", 1)[-1]
    return ArtifactsNotStored(
        f"tracking server {masked(mlflow.get_tracking_uri())} failed to store {name} (HTTP {match['status']} on"
        f" every retry) of run {run_id}: its artifact storage is down or refuses it (the server's log says"
        f" which); {outcome}"
    )


def unreachable_reason(exc: BaseException | str, timeout: float) -> str:
    """How a request failed, short: MLflow's and urllib3's text runs to 300 characters and repeats
    the URL (a password included)."""
    text = masked(exc if isinstance(exc, str) else one_line(exc))
    if "Connection refused" in text:
        return "connection refused"
    if "timed out" in text.lower() or "timeout" in text.lower():
        return f"no answer in {timeout:.0f} s"
    if "Name or service not known" in text or "nodename nor servname" in text:
        return "unknown host name"
    return text[:200]


CREATED_BY_TAG = "mnist_cnn.created_by"  # on a team server the creator manages the experiment


def current_user() -> str:
    """Who this client is: its tracking server login, else the local user."""
    import getpass

    return os.environ.get("MLFLOW_TRACKING_USERNAME") or getpass.getuser()


def experiment_id(name: str, root: Path | None = None) -> str:
    """The id of experiment ``name``, created with artifacts beside the store if it is new (and the
    creator's name in a tag: on a team server, whom to ask for access)."""
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifacts = None
    if mlflow.get_tracking_uri().startswith("sqlite:"):
        artifacts = ((root or project_root()) / ARTIFACTS_DIR).as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=artifacts, tags={CREATED_BY_TAG: current_user()})
    except MlflowException:  # created meanwhile by a parallel run
        return mlflow.get_experiment_by_name(name).experiment_id


def is_local_store() -> bool:
    """A SQLite file: only processes of this machine write to it."""
    return sqlite_path(mlflow.get_tracking_uri()) is not None


def permission_refused(experiment: str) -> TrackingError:
    """A team server's 403 for a run in ``experiment``: who may not, who created it, who can grant it."""
    found = mlflow.get_experiment_by_name(experiment)
    creator = found.tags.get(CREATED_BY_TAG) if found is not None else None
    user = current_user()
    return TrackingError(
        f"tracking server {masked(mlflow.get_tracking_uri())}: {user} may not log runs in experiment {experiment!r}"
        + (f" (created by {creator})" if creator else "")
        + f" (HTTP 403); the server's admin can grant it: python -m mnist_cnn server grant {user}"
    )
