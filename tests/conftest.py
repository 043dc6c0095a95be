"""Shared fixtures: a tiny MNIST-format mirror made from scikit-learn's digits, tiny params, a private
MLflow store per test, and session-scoped templates (a created store, a trained-and-evaluated project,
an initialised and a reproduced DVC repo) that each test gets its own copy of. Nothing here touches
the network or ../shared.

The tiers: tests/unit (in process, no subprocess, no MLflow store), tests/integration (stages, the
store, subprocesses), tests/e2e (real signals, kill -9, torchrun, DVC, mlflow run, the servers, the
browser). docs/tests.md lists them."""

from __future__ import annotations

import os

# One thread per torch process (the tests' own and every stage they start), unless set outside: the
# networks here are tiny, and on 2 shared cores OpenMP's threads spin against each other and against
# whatever else runs (2-epoch trainings measured 8x slower with 2 threads on a busy 2-core machine).
os.environ.setdefault("OMP_NUM_THREADS", "1")
import gc
import pickle
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from filelock import FileLock

from mnist_cnn.core.files import Paths
from mnist_cnn.core.params import Params, parse_params

REPO = Path(__file__).resolve().parents[1]

# An 8/8/16 network: what the tests check (shapes, runs, files, faults) does not need the seed's
# 48/48/112, and it trains in a fraction of the time. Tests that assert accuracy add SEED_WIDTHS.
TINY_WIDTHS = {"model.hidden_1": 8, "model.hidden_2": 8, "model.hidden_3": 16}
SEED_WIDTHS = {"model.hidden_1": 48, "model.hidden_2": 48, "model.hidden_3": 112}

# Small enough for seconds per test on 2 cores; everything else is params.yaml's.
TINY_OVERRIDES = {
    "train.epochs": 2,
    "train.device": "cpu",
    "train.precision": "fp32",
    "evaluate.batch_size": 500,
    **TINY_WIDTHS,
}


@pytest.fixture(scope="session")
def tiny_mirror(tmp_path_factory) -> Path:
    """A directory holding the four tiny IDX .gz files, and beside it their checksums (``md5s.json``)."""
    from tinydata import write_checksums, write_tiny_mnist  # here: it loads torch and scikit-learn

    root = tmp_path_factory.mktemp("tiny")
    mirror = root / "mirror"
    write_checksums(write_tiny_mnist(mirror), root / "md5s.json")
    return mirror


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch, tiny_mirror):
    """Each test: its own MLflow store, the tiny data's checksums, no mirror or run inherited from outside."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # mlflow.set_registry_uri (store.configure) exports MLFLOW_REGISTRY_URI: never let one test's leak
    # into the next one's subprocesses.
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    if "mlflow" in sys.modules:
        # MLflow puts the URI last set in this process (an earlier test's, a template's) before the
        # environment's: this test's store is the one above.
        import mlflow

        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        forget_artifact_locations()
    monkeypatch.setenv("MNIST_MD5S", str(tiny_mirror.parent / "md5s.json"))
    monkeypatch.delenv("MNIST_MIRROR", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    # The stages' commands (`python -m mnist_cnn`) run with this interpreter.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    yield
    # A test that ends while a stage holds signals must not leave its handlers to the next test.
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    if "mlflow" in sys.modules:  # a unit test never imports it for a run
        import mlflow

        while mlflow.active_run() is not None:
            mlflow.end_run()


def forget_artifact_locations() -> None:
    """MLflow caches each run's artifact location by run id alone, for the whole process. A copy of a
    template's store holds the template's run ids: without this, its artifacts would land in the
    template's tree (seen: a copy's evaluate writing into the shared champion's while another test
    copied it)."""
    if "mlflow" in sys.modules:
        from mlflow.tracking._tracking_service import utils as tracking_utils

        tracking_utils._artifact_repos_cache.clear()


def repo_params_raw() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def set_key(raw: dict, key: str, value) -> None:
    """``raw["train"]["optimizer"]["name"] = value`` for ``train.optimizer.name``."""
    *sections, name = key.split(".")
    node = raw
    for section in sections:
        if not isinstance(node.get(section), dict):
            node[section] = {} if section not in node else {"name": node[section]}
        node = node[section]
    node[name] = value


@pytest.fixture
def tiny_params() -> Params:
    return parse_params(repo_params_raw(), TINY_OVERRIDES)


@pytest.fixture
def seed_params() -> Params:
    """The tiny params with the seed's 48/48/112 network, for the tests that assert accuracy."""
    return parse_params(repo_params_raw(), {**TINY_OVERRIDES, **SEED_WIDTHS})


def write_tiny_params(path: Path, **overrides) -> Path:
    raw = repo_params_raw()
    for key, value in {**TINY_OVERRIDES, **overrides}.items():
        set_key(raw, key, value)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def make_project(root: Path, tiny_mirror: Path, **overrides) -> Paths:
    """A project directory with tiny params and the tiny data already downloaded into data/raw."""
    root.mkdir(parents=True, exist_ok=True)
    params_file = write_tiny_params(root / "params.yaml", **overrides)
    shutil.copytree(tiny_mirror, root / "data" / "raw")
    return Paths(root=root, params_file=params_file)


TESTS = Path(__file__).resolve().parent


def tier(request) -> str:
    """``unit``, ``integration`` or ``e2e``: the folder under tests/ the requesting test is in."""
    return Path(request.node.path).resolve().relative_to(TESTS).parts[0]


TIERS = ("unit", "integration", "e2e")


def pytest_configure(config):
    """Ctrl-C back where a shell took it away: a command started with ``&`` by a shell without job control
    (``nohup pytest &`` in a script, CI runners) ignores SIGINT, and so would every process it starts: the
    tests that send SIGINT would wait for an interrupt that never comes. Ignored signals are inherited,
    a handler is not, so the stages these tests start get SIGINT back too. (pytest-xdist's workers run
    this hook as well.)"""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    # Collection loads torch, MLflow and every test module: long-lived objects, no garbage. The cyclic
    # collector stays off until it ends and then leaves them frozen, as a stage's start-up does
    # (core/startup.py); half of collection's CPU.
    gc.disable()


def pytest_collection_finish(session):
    gc.freeze()
    gc.enable()


def pytest_collection_modifyitems(items):
    """The costliest tier first, so that two workers (pytest-xdist) finish together: the long end-to-end
    tests start at once and the many short unit tests fill the gaps at the end. A file outside the
    tiers last. (While you work, ``pytest tests/unit`` is the fast tier on its own.)"""

    def rank(item) -> int:
        folder = Path(item.path).resolve().relative_to(TESTS).parts[0]
        return TIERS[::-1].index(folder) if folder in TIERS else len(TIERS)

    items.sort(key=rank)


@pytest.fixture
def project(request, tmp_path, tiny_mirror) -> Paths:
    """A project directory with tiny params and the tiny data already downloaded into data/raw. In
    tests/unit nothing more (a unit test opens no store); in the other tiers its MLflow store is
    already created (``mlflow_store``)."""
    paths = make_project(tmp_path / "project", tiny_mirror)
    if tier(request) != "unit":
        request.getfixturevalue("mlflow_store")
    return paths


def built_once(tmp_path_factory, name: str, build: Callable[[Path], object]):
    """A session template built once for the whole run, however many pytest-xdist workers share it: the
    first worker to ask runs ``build(folder)`` under a file lock in the run's shared temp directory and
    pickles what it returns; the others wait for it and load that. (Each worker building its own cost the
    reproduced DVC repo 37 s and the champion 22 s twice.) Templates are read only or copied per test."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return build(tmp_path_factory.mktemp(name))
    folder = tmp_path_factory.getbasetemp().parent / f"shared-{name}"
    built = folder / "built.pickle"
    with FileLock(f"{folder}.lock"):
        if built.exists():
            return pickle.loads(built.read_bytes())
        shutil.rmtree(folder, ignore_errors=True)  # a build that failed in another worker
        folder.mkdir()
        result = build(folder)
        built.write_bytes(pickle.dumps(result))
        return result


# The MLflow store. Creating a SQLite store's tables takes MLflow several seconds (its migrations);
# opening a copy of a created one, a fraction of a second.


@pytest.fixture(scope="session")
def store_template(tmp_path_factory) -> Path:
    """An empty SQLite store whose tables MLflow has created. Its one experiment, Default, keeps its
    artifacts in ./mlruns of the directory the store was created from: the template's own folder."""
    from mnist_cnn.tracking import store

    def build(folder: Path) -> Path:
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(folder)
            store.create_store(f"sqlite:///{folder / 'mlflow.db'}")
        return folder / "mlflow.db"

    return built_once(tmp_path_factory, "store-template", build)


def new_store(store_template: Path, path: Path) -> Path:
    """A created store at ``path``: the template copied, Default's artifacts in ./mlruns beside it (as
    if created from that folder)."""
    shutil.copy2(store_template, path)
    repoint_store(path, store_template.parent, path.parent)
    return path


@pytest.fixture
def mlflow_store(tmp_path, store_template) -> Path:
    """The test's own store (``$MLFLOW_TRACKING_URI``), created: a copy of the template."""
    return new_store(store_template, tmp_path / "mlflow.db")


def repoint_store(db: Path, old: Path, new: Path) -> None:
    """A SQLite store records absolute paths (artifact locations, dataset sources): after copying a
    tree that holds a store and its artifacts, point every path under ``old`` at the copy under ``new``."""
    pairs = [(f"{old}/", f"{new}/"), (old.as_uri() + "/", new.as_uri() + "/")]
    with sqlite3.connect(db) as connection:
        tables = [row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            columns = [
                row[1]
                for row in connection.execute(f'PRAGMA table_info("{table}")')
                if any(kind in row[2].upper() for kind in ("CHAR", "TEXT", "CLOB")) or row[2] == ""
            ]
            for column in columns:
                for before, after in pairs:
                    connection.execute(
                        f'UPDATE "{table}" SET "{column}" = replace("{column}", ?, ?) WHERE instr("{column}", ?) > 0',
                        (before, after, before),
                    )
    connection.close()


def copy_tree_with_store(template: Path, dest: Path) -> Path:
    """``template`` copied to ``dest`` (which may exist), every ``mlflow.db`` in it re-pointed at the copy."""
    shutil.copytree(template, dest, symlinks=True, dirs_exist_ok=True)
    for db in dest.rglob("mlflow.db"):
        repoint_store(db, template, dest)
    forget_artifact_locations()
    return dest


# One tiny training, evaluated, in a store of its own: the champion. Tests that only read it use it
# where it is; tests that change it get a copy (``trained_project``).


def tracked_training(
    root: Path, tiny_mirror: Path, params_overrides: dict, cli_overrides: dict, env: dict, evaluated: bool = True
):
    """In ``root``: a store (a copy of the template, at root/mlflow.db) and a project (root/project) whose
    training ran in process (``train.run_train``), then, if ``evaluated``, its evaluation."""
    from mlflow.tracking import MlflowClient

    from mnist_cnn.core.params import load_params
    from mnist_cnn.stages import evaluate, train

    uri = f"sqlite:///{root / 'mlflow.db'}"
    paths = make_project(root / "project", tiny_mirror, **params_overrides)
    with pytest.MonkeyPatch.context() as mp:
        md5s = str(tiny_mirror.parent / "md5s.json")
        for name, value in {"MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri, "MNIST_MD5S": md5s, **env}.items():
            mp.setenv(name, value)
        mp.delenv("MNIST_MIRROR", raising=False)
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        params = load_params(paths.params_file, cli_overrides)
        run_id, result = train.run_train(params, paths, show_progress=False)
        trained = MlflowClient(uri, uri).get_run(run_id)  # as it was before evaluate
        eval_run_id, evaluation = evaluate.run_evaluate(params, paths) if evaluated else (None, None)
    return SimpleNamespace(
        root=root,
        uri=uri,
        project=paths.root,
        paths=paths,
        params=params,
        run_id=run_id,
        eval_run_id=eval_run_id,
        result=result,
        evaluation=evaluation,
        trained_run=trained,
    )


@pytest.fixture(scope="session")
def champion_store(tmp_path_factory, tiny_mirror, store_template):
    """The tiny params' training with the seed's 48/48/112 network (the serving and predict tests check
    its answers are mostly right), evaluated and registered as champion in a store of its own: its
    tracking URI, project directory, the run and results, and a local copy of the champion."""
    import mlflow

    def build(root: Path) -> SimpleNamespace:
        new_store(store_template, root / "mlflow.db")
        built = tracked_training(root, tiny_mirror, SEED_WIDTHS, {}, {})
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MLFLOW_TRACKING_URI", built.uri)
            mp.setenv("MLFLOW_REGISTRY_URI", built.uri)
            mlflow.set_tracking_uri(built.uri)
            mlflow.set_registry_uri(built.uri)
            built.local = Path(
                mlflow.artifacts.download_artifacts("models:/mnist-cnn@champion", dst_path=str(root / "champion"))
            )
        built.built_at = time.time()
        return built

    return built_once(tmp_path_factory, "champion", build)


def changed_since(root: Path, moment: float) -> list[Path]:
    """Files under ``root`` written after ``moment``, but for MLflow's ``registered_model_meta``: loading
    ``models:/NAME@ALIAS`` from a local store (re)writes it into the model's own directory there
    (ModelsArtifactRepository.download_artifacts), so a test that only reads the champion writes it too."""
    return [
        path
        for path in root.rglob("*")
        if path.is_file() and path.name != "registered_model_meta" and path.stat().st_mtime > moment
    ]


@pytest.fixture
def trained_project(champion_store, tmp_path):
    """A copy of the champion's project and store, the test's own: the store at the test's
    ``$MLFLOW_TRACKING_URI`` (tmp_path/mlflow.db), the project at tmp_path/project."""
    copy_tree_with_store(champion_store.root, tmp_path)
    yield SimpleNamespace(
        paths=Paths(root=tmp_path / "project", params_file=tmp_path / "project" / "params.yaml"),
        params=champion_store.params,
        run_id=champion_store.run_id,
        result=champion_store.result,
        evaluation=champion_store.evaluation,
        eval_run_id=champion_store.eval_run_id,
        trained_run=champion_store.trained_run,
    )
    # The template's project (its artifacts are there) is as built: the copy wrote only into itself.
    assert not changed_since(champion_store.project, champion_store.built_at)


@pytest.fixture(scope="session")
def named_run(tmp_path_factory, tiny_mirror, store_template):
    """``train --lr 0.2`` then ``evaluate`` as a user runs them, system metrics sampled every 0.2 s (a tiny
    training lasts a few seconds; MLflow's default is 10 s): the run as it was after training
    (``trained_run``) and the store after evaluating. Read only: the UI test serves it."""

    def build(root: Path) -> SimpleNamespace:
        new_store(store_template, root / "mlflow.db")
        sampled = {"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.2"}
        return tracked_training(root, tiny_mirror, {}, {"lr": "0.2"}, sampled)

    return built_once(tmp_path_factory, "named-run", build)


# Digits as image files, and the champion loaded in process


INK, PAPER = (20, 30, 120), (250, 240, 200)  # blue ink on cream paper


def variants(image):
    """The same digit as a user might have it: 4x larger, black on white, in colour, all three."""
    import numpy as np
    from PIL import Image

    ink, paper = np.array(INK), np.array(PAPER)
    big = Image.fromarray(image).resize((112, 112), Image.Resampling.NEAREST)
    coverage = np.asarray(big, dtype=np.float64)[..., None] / 255.0
    coloured = (paper + (ink - paper) * coverage).round().astype(np.uint8)
    return {
        "raw": Image.fromarray(image),
        "big": big,
        "inverted": Image.fromarray(255 - image),
        "rgb": Image.fromarray((paper + (ink - paper) * image[..., None] / 255.0).round().astype(np.uint8)),
        "big-inverted-rgb": Image.fromarray(coloured),
    }


@pytest.fixture(scope="session")
def digits(tiny_mirror, tmp_path_factory):
    """The tiny test split (digits the models did not train on) written as PNG files, one directory per variant."""
    from mnist_cnn.core.data import load_split

    root = tmp_path_factory.mktemp("digits")
    images = load_split(tiny_mirror, train=False).images.numpy()
    for i, image in enumerate(images):
        for name, picture in variants(image).items():
            (root / name).mkdir(exist_ok=True)
            picture.save(root / name / f"{i:03d}.png")
    return root, images


@pytest.fixture
def champion_env(champion_store, monkeypatch):
    """The champion's store as this test's (read, never changed): here and for its child processes."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", champion_store.uri)
    mlflow.set_tracking_uri(champion_store.uri)
    mlflow.set_registry_uri(champion_store.uri)
    return {**os.environ, "MLFLOW_TRACKING_URI": champion_store.uri}


@pytest.fixture(scope="session")
def champion(champion_store):
    """The shared tiny champion loaded in-process, and its answer for the tiny test split (digits it did
    not train on)."""
    import mlflow
    import numpy as np

    from mnist_cnn.core.data import load_split

    model = mlflow.pyfunc.load_model(str(champion_store.local))
    test = load_split(champion_store.project / "data" / "raw", train=False)
    pixels = test.images.numpy()  # uint8, 0-255: what a client sends
    return SimpleNamespace(
        uri=champion_store.uri,
        pixels=pixels,
        labels=test.labels.numpy(),
        expected=model.predict(pixels.astype(np.float32)),
        model=model,
        local=str(champion_store.local),
    )


# DVC


def copy_project_files(dest: Path) -> None:
    """The files a user's clone has (code, pipeline, MLproject), without data, store or venv."""
    for name in ("dvc.yaml", "MLproject", "conda.yaml", "params.yaml", "pyproject.toml"):
        shutil.copy2(REPO / name, dest / name)
    shutil.copytree(REPO / "src", dest / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))


def sh(args, cwd, env=None):
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def dvc(*args, cwd, env=None):
    return sh([sys.executable, "-m", "dvc", *args], cwd, env)


def git(*args, cwd):
    return sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd)


@pytest.fixture(scope="session")
def dvc_template(tmp_path_factory) -> Path:
    """A git repo with DVC initialised: the project's files, tiny params, one commit."""
    repo = tmp_path_factory.mktemp("dvc-template") / "repo"
    repo.mkdir()
    copy_project_files(repo)
    write_tiny_params(repo / "params.yaml")
    (repo / ".gitignore").write_text("mlflow.db\nmlartifacts/\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GIT_CONFIG_NOSYSTEM", "1")
        mp.setenv("DVC_NO_ANALYTICS", "1")
        git("init", "-q", cwd=repo)
        dvc("init", "-q", cwd=repo)
        git("add", "-A", cwd=repo)
        git("commit", "-qm", "init", cwd=repo)
    return repo


def _use_repo(repo: Path, tiny_mirror: Path, monkeypatch) -> Path:
    monkeypatch.setenv("MNIST_MIRROR", str(tiny_mirror))
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the default store: <repo>/mlflow.db
    monkeypatch.delenv("MLFLOW_REGISTRY_URI")
    return repo


@pytest.fixture
def dvc_repo(dvc_template, tmp_path, tiny_mirror, monkeypatch) -> Path:
    """The test's own copy of the initialised repo; its stages download from the tiny mirror."""
    repo = tmp_path / "repo"
    shutil.copytree(dvc_template, repo, symlinks=True)
    return _use_repo(repo, tiny_mirror, monkeypatch)


@pytest.fixture(scope="session")
def reproduced_template(dvc_template, tmp_path_factory, tiny_mirror, store_template):
    """The initialised repo with the seed's 48/48/112 network (the test of the first repro checks its
    accuracy) after one ``dvc repro`` (its output kept) and a commit of the result; its store
    (<repo>/mlflow.db) holds the baseline's run."""
    return built_once(
        tmp_path_factory,
        "reproduced",
        lambda folder: reproduce(folder / "repo", dvc_template, tiny_mirror, store_template),
    )


def reproduce(repo: Path, dvc_template: Path, tiny_mirror: Path, store_template: Path) -> SimpleNamespace:
    """``dvc_template`` copied to ``repo`` with the seed's network, reproduced and committed; the output kept."""
    shutil.copytree(dvc_template, repo, symlinks=True)
    new_store(store_template, repo / "mlflow.db")
    write_tiny_params(repo / "params.yaml", **SEED_WIDTHS)
    with pytest.MonkeyPatch.context() as mp:
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
            mp.delenv(name, raising=False)
        mp.setenv("MNIST_MIRROR", str(tiny_mirror))
        mp.setenv("MNIST_MD5S", str(tiny_mirror.parent / "md5s.json"))
        mp.setenv("GIT_CONFIG_NOSYSTEM", "1")
        mp.setenv("DVC_NO_ANALYTICS", "1")
        mp.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
        git("commit", "-qam", "the seed's network", cwd=repo)
        output = dvc("repro", cwd=repo)
        git("add", "-A", cwd=repo)
        git("commit", "-qm", "baseline", cwd=repo)
    return SimpleNamespace(repo=repo, output=output)


@pytest.fixture
def reproduced_repo(reproduced_template, tmp_path, tiny_mirror, monkeypatch) -> Path:
    """The test's own copy of the reproduced, committed repo, its store re-pointed at the copy."""
    repo = copy_tree_with_store(reproduced_template.repo, tmp_path / "repo")
    return _use_repo(repo, tiny_mirror, monkeypatch)


def run_queue(repo: Path, workers: int = 2, timeout: float = 900) -> str:
    """``dvc queue start -j WORKERS``, wait until nothing is queued or running; ``dvc queue status``."""
    dvc("queue", "start", "-j", str(workers), cwd=repo)
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = dvc("queue", "status", cwd=repo)
        if "Queued" not in status and "Running" not in status:
            return status
        time.sleep(5)  # each look is a `dvc` process (about 1 s of CPU)
    dvc("queue", "stop", "--kill", cwd=repo)
    return status


# Stages in a child process


def stage(project, *args: str, env: dict | None = None) -> subprocess.Popen:
    """``python -m mnist_cnn ARGS`` in the project directory, output merged and line-buffered."""
    return subprocess.Popen(
        [sys.executable, "-u", "-m", "mnist_cnn", *args, "--no-progress"],
        cwd=project.root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )


def wait_for_line(proc: subprocess.Popen, needle: str, timeout: float = 120) -> list[str]:
    lines, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    proc.kill()
    raise AssertionError(f"{needle!r} never printed:\n{''.join(lines)}")


def output_within(proc: subprocess.Popen, seconds: float) -> str:
    """What ``proc`` printed, once it has ended; if it has not ended within ``seconds``, it is killed and the
    test fails showing all of it (where it was when it should have stopped)."""
    try:
        return proc.communicate(timeout=seconds)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"still running after {seconds} s:\n{proc.communicate()[0]}") from None


def ended_after_fault(proc: subprocess.Popen, before: list[str], fault, timeout: float) -> tuple[str, float]:
    """Make ``fault()`` happen, then wait for ``proc`` to end: all it printed (``before`` included) and the
    seconds from the fault to its end."""
    fault()
    at = time.monotonic()
    after = output_within(proc, timeout)
    return "".join(before) + after, time.monotonic() - at


def the_error_line(proc: subprocess.Popen, output: str) -> str:
    """The one ``error:`` line of a stage that failed (exit 1), as its output has it."""
    assert proc.returncode == 1, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    return errors[0]


def the_runs(experiment="mnist-cnn"):
    import mlflow
    from mlflow.tracking import MlflowClient

    from mnist_cnn.tracking import store

    store.configure()
    exp = mlflow.get_experiment_by_name(experiment)
    return MlflowClient().search_runs([exp.experiment_id], order_by=["start_time ASC"]) if exp else []


def only_run(experiment="mnist-cnn"):
    runs = the_runs(experiment)
    assert len(runs) == 1
    return runs[0]


EPOCH_LINE = "epoch {epoch:>3}/"


def assert_one_chain_of_champions(tags: dict[str, dict[str, str]], champion: str, alpha: float = 0.05) -> None:
    """Versions evaluated at once decided one after the other (the registry lock): the promoted ones form
    one chain, each over the champion before it, ending at ``champion``; and every decision follows the
    rule from the validation answers the versions recorded. ``tags``: {version: its tags}."""
    from mnist_cnn.core.selection import Scored, decide, decode

    promoted = {v: t["promotion.champion_before"] for v, t in tags.items() if t["promotion.decision"] == "promoted"}
    assert list(promoted.values()).count("") == 1, tags  # one first champion
    assert len(set(promoted.values())) == len(promoted), tags  # no two promotions over one champion
    chain = [next(v for v, before in promoted.items() if before == "")]
    while following := [v for v, before in promoted.items() if before == chain[-1]]:
        chain += following
    assert sorted(chain) == sorted(promoted) and chain[-1] == champion, (chain, champion)

    def scored(version: str) -> Scored:
        return Scored(version, tags[version]["selection.split"], decode(tags[version]["selection.correct"]))

    for version, tag in tags.items():
        before = tag["promotion.champion_before"]
        if before:
            assert before in promoted, tags  # compared with a version that held the alias
            decision = decide(scored(version), scored(before), alpha)
            assert decision.promote == (tag["promotion.decision"] == "promoted"), (version, tag)


def error_line(stderr: str) -> str:
    """The one ``error:`` line of a stage's stderr (MLflow's own INFO lines may come before it)."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def processes_in(root) -> list:
    """Processes working in ``root`` (the stage, torchrun and its workers)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cwd"]):
        if proc.info["cwd"] and proc.info["cwd"] == str(root):
            found.append(proc)
    return found
