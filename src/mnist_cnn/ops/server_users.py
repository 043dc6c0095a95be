"""The team server's logins and permissions, through MLflow's own REST API as the admin: ``server
add-user NAME`` (a login) and ``server grant NAME`` (EDIT on the shared experiment and registered model).

Everyone reads (``default_permission = READ``); the first user to create an experiment or a registered
model manages it. ``grant`` lets another user log runs into the shared experiment and add versions to
the shared model; if either does not exist yet, the admin creates it, so that no user owns it by chance.
"""

from __future__ import annotations

from mnist_cnn.core.errors import one_line
from mnist_cnn.ops.server import ADMIN, MAX_USERNAME, MIN_PASSWORD, admin_password
from mnist_cnn.ops.server_state import ServerError

EXPERIMENT = MODEL = "mnist-cnn"  # params.yaml's mlflow.experiment and mlflow.registered_model defaults


def _admin_call(url: str, method: str, endpoint: str, **kwargs):
    """``endpoint`` (``2.0/mlflow/...``) as the admin; the response, whatever its status. Unreachable, or the
    admin's password refused: one line."""
    import requests

    try:
        response = requests.request(
            method, f"{url}/api/{endpoint}", auth=(ADMIN, admin_password()), timeout=30, **kwargs
        )
    except requests.RequestException as exc:
        raise ServerError(f"{url}: unreachable ({type(exc).__name__}); is the server started?") from None
    if response.status_code == 401:
        raise ServerError(
            f"{url}: refused the admin login (HTTP 401); MLFLOW_AUTH_ADMIN_PASSWORD must be the admin's password"
        )
    return response


def _error(response) -> dict:
    try:
        error = response.json()
    except ValueError:
        error = None
    return error if isinstance(error, dict) else {"message": response.text}


def _refused(url: str, what: str, response) -> ServerError:
    reason = one_line(Exception(_error(response).get("message") or response.reason))[:200]
    return ServerError(f"{url}: could not {what} (HTTP {response.status_code}: {reason})")


def _check_new_login(username: str, password: str) -> None:
    """Refuse, before calling the server, what it would store as a login nobody can use or cannot store."""
    shown = repr(username if len(username) <= 40 else username[:40] + "…")
    if len(username) > MAX_USERNAME:
        raise ServerError(f"user name {shown} has {len(username)} characters; at most {MAX_USERNAME}")
    if ":" in username:  # HTTP basic auth sends "name:password" and splits at the first ':'
        raise ServerError(f"user name {shown} contains ':': HTTP basic auth could never log it in")
    if not username.isprintable():
        raise ServerError(f"user name {shown} contains control characters")
    if len(password) < MIN_PASSWORD:
        raise ServerError(
            f"the password for {shown} has {len(password)} characters; MLflow requires at least {MIN_PASSWORD}"
        )


def add_user(url: str, username: str, password: str) -> None:
    """Create a login through the server's own API, as the admin."""
    _check_new_login(username, password)
    response = _admin_call(url, "POST", "2.0/mlflow/users/create", json={"username": username, "password": password})
    if response.status_code == 200:
        return
    if _error(response).get("error_code") == "RESOURCE_ALREADY_EXISTS":
        raise ServerError(f"user {username!r} already exists")
    raise _refused(url, f"create user {username!r}", response)


def _experiment_id(url: str, name: str) -> str:
    """The shared experiment's id, created by the admin if it does not exist yet."""
    found = _admin_call(url, "GET", "2.0/mlflow/experiments/get-by-name", params={"experiment_name": name})
    if found.status_code == 200:
        return found.json()["experiment"]["experiment_id"]
    created = _admin_call(url, "POST", "2.0/mlflow/experiments/create", json={"name": name})
    if created.status_code != 200:
        raise _refused(url, f"create experiment {name!r}", created)
    return created.json()["experiment_id"]


def _ensure_model(url: str, name: str) -> None:
    if _admin_call(url, "GET", "2.0/mlflow/registered-models/get", params={"name": name}).status_code == 200:
        return
    created = _admin_call(url, "POST", "2.0/mlflow/registered-models/create", json={"name": name})
    if created.status_code != 200 and _error(created).get("error_code") != "RESOURCE_ALREADY_EXISTS":
        raise _refused(url, f"create registered model {name!r}", created)


def grant(url: str, username: str, experiment: str = EXPERIMENT, model: str = MODEL) -> list[str]:
    """EDIT for ``username`` on the experiment and the registered model (each created by the admin if
    missing); what was granted, or already held, as lines to print."""
    resources = [("experiment", _experiment_id(url, experiment), f"experiment {experiment!r}")]
    _ensure_model(url, model)
    resources.append(("registered_model", model, f"registered model {model!r}"))
    done = []
    for kind, resource_id, shown in resources:
        body = {"username": username, "resource_type": kind, "resource_id": resource_id, "permission": "EDIT"}
        response = _admin_call(url, "POST", "3.0/mlflow/users/permissions/grant", json=body)
        if response.status_code == 200:
            done.append(f"{username} may now edit {shown}")
        elif _error(response).get("error_code") == "RESOURCE_ALREADY_EXISTS":
            done.append(f"{username} already had a permission on {shown} (unchanged)")
        else:
            raise _refused(url, f"grant {username!r} EDIT on {shown}", response)
    return done
