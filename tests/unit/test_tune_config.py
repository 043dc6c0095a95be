"""The tune section checked before any trial: bad ranges and keys, unreachable storage; the storage's
home and the workers' database lock (no MLflow store)."""

from __future__ import annotations

import os
from pathlib import Path

import optuna
import pytest

from mnist_cnn.cli import main
from mnist_cnn.stages.tune_study import TuneError, open_storage
from tune_helpers import write_tune_params


@pytest.mark.parametrize(
    ("tune", "message"),
    [
        (
            {"space": {"train.lr": {"low": 0.5, "high": 0.1}}},
            "tune.space.train.lr.high = 0.1: expected a number > low (0.5): an empty or inverted range",
        ),
        (
            {"space": {"model.hidden_3": {"low": 32, "high": 32}}},
            "tune.space.model.hidden_3.high = 32: expected a number > low (32): an empty or inverted range",
        ),
        (
            {"space": {"model.dropout1": {"low": 0.0, "high": 0.5, "log": True}}},
            "tune.space.model.dropout1.low = 0.0: expected a number > 0 with log: true",
        ),
        ({"space": {"train.learning_rate": {"low": 0.1, "high": 1.0}}}, "tune.space.train.learning_rate: unknown"),
        ({"n_trials": 0}, "tune.n_trials = 0: expected an integer >= 1"),
        ({"pruner": "asha"}, "tune.pruner.name = 'asha': expected median | hyperband | none"),
        (
            {"space": {"model.dropout2": {"low": 0.0, "high": 1.5}}},
            "tune.space.model.dropout2.high: model.dropout2 = 1.5: expected a number in [0, 1)",
        ),
        ({"space": {"train.batch_size": {"choices": []}}}, "tune.space.train.batch_size.choices = []: expected"),
        (
            {"space": {"model.kernel_size": {"low": 3, "high": 5}}},
            "tune.space.model.kernel_size (low..high holds 4; list the allowed values as choices): "
            "model.kernel_size = 4: expected 3 (the seed's) or 5",
        ),
        # Keys a trial does not take from its sampled values (or whose search is a mistake): never searched
        (
            {"space": {"train.device": {"choices": ["cpu", "cuda"]}}},
            "tune.space.train.device: not searchable (every trial trains on the worker's device; set it with"
            " --train.device)",
        ),
        ({"space": {"train.precision": {"choices": ["fp32", "bf16"]}}}, "tune.space.train.precision: not searchable"),
        ({"space": {"train.processes": {"low": 1, "high": 4}}}, "tune.space.train.processes: not searchable"),
        ({"space": {"train.compile": {"choices": ["none", "default"]}}}, "tune.space.train.compile: not searchable"),
        ({"space": {"train.resume": {"choices": ["auto", "never"]}}}, "tune.space.train.resume: not searchable"),
        ({"space": {"train.val_split": {"low": 0.1, "high": 0.2}}}, "tune.space.train.val_split: not searchable"),
        (
            {"space": {"seed": {"low": 0, "high": 100}}},
            "tune.space.seed: not searchable (a seed that happens to score well is luck, not a better configuration)",
        ),
        ({"space": {"train.epochs": {"low": 1, "high": 9}}}, "tune.space.train.epochs: not searchable (trial epochs"),
        (
            {"space": {"train.monitor": {"choices": ["val_loss", "val_acc"]}}},
            "tune.space.train.monitor: not searchable",
        ),
        # One value is no search: every trial would train the same configuration.
        (
            {"space": {"train.batch_size": {"choices": [64]}}},
            "tune.space.train.batch_size.choices = [64]: expected two or more different values (to train with"
            " one, set train.batch_size in params.yaml)",
        ),
        (
            {"space": {"train.lr": {"choices": [0.5, 0.5]}}},
            "tune.space.train.lr.choices = [0.5, 0.5]: expected two or more different values",
        ),
    ],
)
def test_bad_tune_section_is_one_line_and_exit_2_before_any_trial(project, capsys, tune, message):
    write_tune_params(project.params_file, **tune)
    code = main(["tune", "--params", str(project.params_file), "--root", str(project.root)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {project.params_file}: {message}"), err
    assert not (project.root / "tune").exists() and not (project.root / "reports").exists()


def test_n_trials_from_the_command_line_is_checked_too(project, capsys):
    write_tune_params(project.params_file)
    code = main(["tune", "--params", str(project.params_file), "--root", str(project.root), "--tune.n_trials", "0"])
    assert code == 2
    expected = f"error: {project.params_file}: tune.n_trials = 0: expected an integer >= 1"
    assert capsys.readouterr().err.strip() == expected


def test_train_processes_above_1_is_refused_for_tune(project, capsys):
    """Trials train in this process, one after another: torchrun is never started for them."""
    write_tune_params(project.params_file)
    code = main(["tune", "--params", str(project.params_file), "--root", str(project.root), "--train.processes", "2"])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {project.params_file}: train.processes = 2: expected 1 for tune (each trial trains in one"
        " process; start several tune workers to use more)"
    )
    assert not (project.root / "tune").exists()


def test_unreachable_study_database_is_one_line_before_any_trial(project, capsys):
    write_tune_params(project.params_file, storage="postgresql+psycopg://bob:s3cret@127.0.0.1:9/optuna")
    code = main(["tune", "--params", str(project.params_file), "--root", str(project.root)])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: tune.storage = 'postgresql+psycopg://bob:***@127.0.0.1:9/optuna': cannot be reached")
    assert "s3cret" not in err
    assert not Path(os.environ["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///")).exists()  # MLflow untouched
    assert not (project.root / "reports").exists()


def test_a_journal_under_home_is_opened_there(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    root = tmp_path / "project"
    root.mkdir()
    storage, _ = open_storage("~/studies/s.journal", root, "s")
    optuna.create_study(study_name="s", storage=storage)
    assert (tmp_path / "home" / "studies" / "s.journal").stat().st_size > 0
    assert list(root.iterdir()) == []  # no literal `~` folder in the project


def test_a_home_that_cannot_be_found_names_tune_storage(tmp_path):
    with pytest.raises(TuneError, match=r"^tune.storage = '~no-such-user-x/s.journal': cannot expand ~ \("):
        open_storage("~no-such-user-x/s.journal", tmp_path, "s")


def test_database_lock_is_exclusive_across_workers_and_a_stale_one_is_broken(tmp_path):
    import threading
    import time

    from mnist_cnn.stages.tune_study import database_lock

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.storages.RDBStorage(url)  # the tables, once
    order: list[str] = []

    def hold(name: str) -> None:
        with database_lock(optuna.storages.RDBStorage(url), "s.workers-lock"):  # an engine each, as two machines
            order.append(f"{name} in")
            time.sleep(0.5)
            order.append(f"{name} out")

    threads = [threading.Thread(target=hold, args=(name,)) for name in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert order in (["a in", "a out", "b in", "b out"], ["b in", "b out", "a in", "a out"])

    storage = optuna.storages.RDBStorage(url)
    dead = storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], "s.workers-lock")
    storage.set_study_user_attr(dead, "created", time.time() - 3600)  # its holder died an hour ago
    started = time.monotonic()
    with database_lock(storage, "s.workers-lock"):
        assert time.monotonic() - started < 30
    assert optuna.get_all_study_summaries(url) == []


@pytest.mark.parametrize(
    ("storage", "why"),
    [
        ("/dev/null", "/dev/null is not a regular file (expected an Optuna journal file)"),
        ("data", "{root}/data is a directory (expected an Optuna journal file)"),
        ("params.yaml/s.journal", "{root}/params.yaml is not a directory"),
    ],
)
def test_a_storage_path_that_cannot_be_a_journal_is_one_line_and_makes_no_lock(project, capsys, storage, why):
    write_tune_params(project.params_file)
    before = set(Path("/dev").iterdir()), sorted(project.root.rglob("*"))
    code = main(["tune", "--params", str(project.params_file), "--root", str(project.root), "--tune.storage", storage])
    assert code == 1
    expected = f"error: tune.storage = {storage!r}: {why.format(root=project.root)}"
    assert capsys.readouterr().err.strip() == expected
    assert (set(Path("/dev").iterdir()), sorted(project.root.rglob("*"))) == before  # no .workers.lock anywhere
    assert not Path("/dev/null.workers.lock").exists()


def test_a_journal_in_a_directory_that_cannot_be_written_is_one_line(project, capsys):
    """A read-only mount refuses even root (access(2) answers EROFS)."""
    import subprocess

    studies = project.root / "studies"
    studies.mkdir()
    if os.geteuid() == 0:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(studies)], capture_output=True
        )
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount a read-only tmpfs: {mounted.stderr.decode().strip()}")
    else:
        studies.chmod(0o555)
    try:
        write_tune_params(project.params_file, storage="studies/s.journal")
        code = main(["tune", "--params", str(project.params_file), "--root", str(project.root)])
        assert code == 1
        assert capsys.readouterr().err.strip() == (
            f"error: tune.storage = 'studies/s.journal': the directory {studies} is not writable"
        )
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(studies)], check=True)
        else:
            studies.chmod(0o755)


def test_tune_help_is_tunes_own(capsys):
    assert main(["tune", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: mnist-cnn tune ") and "--tune.n_trials" in out and "--clean" not in out
