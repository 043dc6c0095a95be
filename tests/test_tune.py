"""The tune stage for real: Optuna on the tiny data, the real fit, a private MLflow store, the DVC CLI."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from conftest import REPO, dvc, write_tiny_params
from mnist_cnn.cli import main
from mnist_cnn.core.params import load_params, parse_params
from mnist_cnn.core.search import load_tune
from mnist_cnn.stages.tune import OWNER_ATTR, PARENT_ATTR, RUN_ATTR, tune
from mnist_cnn.stages.tune_study import TuneError, open_storage
from mnist_cnn.tracking import store

# lr 1e-5 learns nothing in an epoch: once a trial with lr 1.0 has finished, the median pruner stops
# every 1e-5 trial after its first epoch.
TINY_SPACE = {
    "train.lr": {"choices": [1.0, 0.00001]},
    "model.hidden_3": {"low": 16, "high": 32, "log": True},
}
TINY_TUNE = {
    "n_trials": 4,
    "epochs": 2,
    "pruner": {"name": "median", "startup_trials": 1, "warmup_epochs": 0},
    "space": TINY_SPACE,
}


def write_tune_params(path: Path, **tune) -> Path:
    write_tiny_params(path, **{"model.hidden_1": 8, "model.hidden_2": 8})
    raw = yaml.safe_load(path.read_text())
    raw["tune"].update({**TINY_TUNE, **tune})
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def journal(root: Path, name: str = "mnist-cnn") -> optuna.Study:
    backend = optuna.storages.journal.JournalFileBackend(str(root / "tune" / "study.journal"))
    return optuna.load_study(study_name=name, storage=optuna.storages.JournalStorage(backend))


def tune_runs(root: Path) -> tuple[list, list]:
    """(parents, children) of the experiment mnist-cnn."""
    store.configure(root)
    experiment = mlflow.get_experiment_by_name("mnist-cnn")
    runs = MlflowClient().search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return parents, [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def check_study_and_runs(root: Path, n_trials: int, epochs: int) -> tuple[optuna.Study, object]:
    """Every trial once and finished, one child run each under the one FINISHED parent, best params file."""
    study = journal(root)
    trials = study.get_trials()
    assert sorted(t.number for t in trials) == list(range(n_trials))
    assert {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    parents, children = tune_runs(root)
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED" and study.user_attrs[PARENT_ATTR] == parent.info.run_id
    assert sorted(int(c.data.tags["optuna.trial_number"]) for c in children) == list(range(n_trials))
    client = MlflowClient()
    for trial in trials:
        (child,) = [c for c in children if c.data.tags["optuna.trial_number"] == str(trial.number)]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert trial.user_attrs[RUN_ATTR] == child.info.run_id
        assert {k: float(child.data.params[k]) for k in trial.params} == pytest.approx(trial.params)
        assert child.data.params["train.epochs"] == str(epochs)
        assert child.data.params["train.monitor"] == "val_loss"  # the study's value is the loss it kept
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_loss")]
        if trial.state == TrialState.COMPLETE:
            assert (child.info.status, child.data.tags["optuna.state"]) == ("FINISHED", "complete")
            assert steps == list(range(1, epochs + 1))
        else:
            assert (child.info.status, child.data.tags["optuna.state"]) == ("KILLED", "pruned")
            assert steps == sorted(trial.intermediate_values) and len(steps) < epochs

    best = study.best_trial
    assert parent.data.metrics["best_value"] == pytest.approx(best.value)
    assert parent.data.tags["best.trial"] == str(best.number)
    assert {k: parent.data.tags[f"best.{k}"] for k in best.params} == {k: str(v) for k, v in best.params.items()}
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"optimization_history.png", "param_importances.png", "best_params.yaml"} <= artifacts

    written = yaml.safe_load((root / "reports" / "best_params.yaml").read_text())
    assert {f"{s}.{k}": v for s, values in written.items() for k, v in values.items()} == best.params
    assert not list((root / "reports").glob(".*.tmp"))
    # A copy into params.yaml gives valid params with those values.
    raw = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in written.items():
        raw[section].update(values)
    applied = parse_params(raw)
    assert applied.train.lr == best.params["train.lr"] and applied.model.hidden_3 == best.params["model.hidden_3"]
    return study, parent


def test_tune_runs_a_study_with_pruning_and_nested_runs(project, monkeypatch):
    import mnist_cnn.stages.tune as tune_module

    calls = {"load_train_val": 0, "fit": 0}

    def counted(name):
        real = getattr(tune_module, name)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        return wrapper

    for name in calls:
        monkeypatch.setattr(tune_module, name, counted(name))
    write_tune_params(project.params_file)
    params = load_params(project.params_file, {"train.monitor": "val_acc"})  # trials keep by loss all the same
    cfg = load_tune(project.params_file, params)
    result = tune(params, cfg, project.root, show_progress=False)

    assert result.trials_run == [0, 1, 2, 3] and result.best_params_written
    assert calls == {"load_train_val": 1, "fit": 4}  # the data once per worker; the train stage's own fit
    study, parent = check_study_and_runs(project.root, n_trials=4, epochs=2)
    states = [t.state for t in study.get_trials()]
    assert TrialState.PRUNED in states and TrialState.COMPLETE in states, states
    assert result.best_trial == study.best_trial.number and result.parent_run_id == parent.info.run_id
    assert parent.data.params["tune.n_trials"] == "4"
    assert parent.data.params["tune.pruner"] == "{name: median, startup_trials: 1, warmup_epochs: 0}"

    # Run again: the study is complete, no trial is added, the same parent is reopened and ended.
    again = tune(params, cfg, project.root, show_progress=False)
    assert again.trials_run == [] and again.parent_run_id == parent.info.run_id
    check_study_and_runs(project.root, n_trials=4, epochs=2)


def test_two_workers_share_one_study_and_one_parent_run(project):
    n_trials = 4
    write_tune_params(project.params_file, n_trials=n_trials, epochs=1, pruner="none")
    command = [sys.executable, "-m", "mnist_cnn", "tune", "--no-progress", "--params", str(project.params_file)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}  # two workers on two shared cores
    workers = [
        subprocess.Popen(command, cwd=project.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [worker.communicate(timeout=300) for worker in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n".join(out + err for out, err in outputs)

    ran = [re.search(r"ran trial\(s\) (\[.*\]|none)", out).group(1) for out, _ in outputs]
    numbers = [yaml.safe_load(r) if r != "none" else [] for r in ran]
    assert all(numbers), f"both workers must run trials: {ran}"
    assert sorted(numbers[0] + numbers[1]) == list(range(n_trials))
    parent_ids = {re.search(r"parent run (\w+)", out).group(1) for out, _ in outputs}
    assert len(parent_ids) == 1

    study, parent = check_study_and_runs(project.root, n_trials=n_trials, epochs=1)
    assert parent_ids == {parent.info.run_id}
    assert study.user_attrs["mnist_cnn.workers"] == 2 and study.user_attrs["mnist_cnn.active_workers"] == []
    assert all(OWNER_ATTR in t.user_attrs for t in study.get_trials())
    writers = [err.count("written to reports/best_params.yaml") for _, err in outputs]
    assert sorted(writers) == [0, 1], "the best params are written once, by the worker that finishes last"


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


def test_database_storage_url_runs_the_study(project, tmp_path):
    """Any database URL works as the study's storage (SQLite here; PostgreSQL for the team)."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    write_tune_params(project.params_file, storage=url, n_trials=2, epochs=1, pruner="none")
    params = load_params(project.params_file)
    result = tune(params, load_tune(project.params_file, params), project.root, show_progress=False)
    assert result.trials_run == [0, 1] and result.best_params_written
    study = optuna.load_study(study_name="mnist-cnn", storage=url)
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE] * 2
    assert [s.study_name for s in optuna.get_all_study_summaries(url)] == ["mnist-cnn"]  # the lock is gone
    parents, children = tune_runs(project.root)
    assert len(parents) == 1 and len(children) == 2


def test_plain_dvc_repro_never_runs_tune_but_its_own_pipeline_file_does(dvc_repo):
    (dvc_repo / "tune").mkdir()
    shutil.copy2(REPO / "tune" / "dvc.yaml", dvc_repo / "tune" / "dvc.yaml")
    shutil.copy2(REPO / ".gitignore", dvc_repo / ".gitignore")
    write_tune_params(dvc_repo / "params.yaml", n_trials=1, epochs=1, pruner="none")
    dvc("repro", "download", cwd=dvc_repo)

    def planned(*args: str) -> str:
        # --dry stops (exit 255) at evaluate, whose models/model.pt a dry train does not make
        command = [sys.executable, "-m", "dvc", *args, "--dry"]
        done = subprocess.run(command, cwd=dvc_repo, capture_output=True, text=True, timeout=300)
        return done.stdout + done.stderr

    repro, exp_run = planned("repro"), planned("exp", "run")  # exp run --dry: a workspace without data/raw
    assert "Running stage 'train'" in repro and "tune" not in repro
    assert "Running stage 'download'" in exp_run and "tune" not in exp_run

    ran = dvc("repro", "tune/dvc.yaml", cwd=dvc_repo)
    assert "Running stage 'tune/dvc.yaml:tune'" in ran and "'train'" not in ran
    assert (dvc_repo / "reports" / "best_params.yaml").is_file() and (dvc_repo / "tune" / "dvc.lock").is_file()
    assert [t.state for t in journal(dvc_repo).get_trials()] == [TrialState.COMPLETE]
    assert "up to date" in dvc("status", "tune/dvc.yaml", cwd=dvc_repo)


def test_a_diverging_trial_fails_and_the_study_goes_on(project):
    write_tune_params(project.params_file, n_trials=1, epochs=1, pruner="none", space={"train.lr": {"choices": [1e12]}})
    params = load_params(project.params_file)
    result = tune(params, load_tune(project.params_file, params), project.root, show_progress=False)
    assert result.trials_run == [0] and result.best_trial is None and not result.best_params_written
    assert [t.state for t in journal(project.root).get_trials()] == [TrialState.FAIL]
    (parent,), (child,) = tune_runs(project.root)
    assert (child.info.status, child.data.tags["optuna.state"]) == ("FAILED", "fail")
    assert parent.info.status == "FINISHED" and "best_value" not in parent.data.metrics
    assert not (project.root / "reports" / "best_params.yaml").exists()


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


def finished_study(project, **tune_values):
    """A study of one one-epoch trial, ended: its parent run FINISHED."""
    write_tune_params(project.params_file, **{"n_trials": 1, "epochs": 1, "pruner": "none", **tune_values})
    params = load_params(project.params_file)
    tune(params, load_tune(project.params_file, params), project.root, show_progress=False)
    (parent,), _ = tune_runs(project.root)
    assert parent.info.status == "FINISHED"
    return parent


def run_tune_cli(project, capsys, *args: str) -> tuple[int, str]:
    capsys.readouterr()  # not what earlier calls logged
    code = main(["tune", "--no-progress", "--params", str(project.params_file), "--root", str(project.root), *args])
    return code, capsys.readouterr().err.strip()


def assert_untouched(project, parent, journal_bytes: bytes) -> None:
    """The study's parent run as it was (not reopened), the journal byte for byte, no trial added."""
    (now,), children = tune_runs(project.root)
    assert (now.info.status, now.info.end_time) == (parent.info.status, parent.info.end_time)
    assert len(children) == 1
    assert (project.root / "tune" / "study.journal").read_bytes() == journal_bytes
    assert not (project.root / "tune" / "study.journal.lock").exists()  # Optuna's append lock is released


def test_a_damaged_journal_is_one_line_and_exit_1_and_nothing_is_touched(project, capsys):
    parent = finished_study(project)
    path = project.root / "tune" / "study.journal"
    good = path.read_bytes()
    params_yaml = project.params_file.read_bytes()
    lines = good.count(b"\n")
    damaged = {
        good[:-40]: f"line {lines}: cut off, no end of line",
        good + b"garbage\n": f"line {lines + 1}: Expecting value at column 1",
        good.replace(b"\n", b"\n[1, 2]\n", 1): "line 2: JSON, but not an Optuna journal entry",
        b"\xff\xfe\n" + good: "line 1: not UTF-8 text",
    }
    for content, reason in damaged.items():
        path.write_bytes(content)
        code, err = run_tune_cli(project, capsys)
        assert code == 1
        assert err == f"error: tune.storage = 'tune/study.journal': not a readable Optuna journal ({reason})"
        assert_untouched(project, parent, content)

    code, err = run_tune_cli(project, capsys, "--tune.storage", "params.yaml")  # a slip of the tongue
    assert code == 1
    assert (
        err
        == "error: tune.storage = 'params.yaml': not a readable Optuna journal (line 1: Expecting value at column 1)"
    )
    assert project.params_file.read_bytes() == params_yaml

    path.write_bytes(good)  # the journal as Optuna wrote it passes: the study is complete, no trial is added
    code, _ = run_tune_cli(project, capsys)
    assert code == 0 and len(journal(project.root).get_trials()) == 1


def test_another_search_space_for_an_existing_study_is_one_line_before_any_change(project, capsys):
    parent = finished_study(project, space=TINY_SPACE)
    journal_bytes = (project.root / "tune" / "study.journal").read_bytes()
    hidden_3 = TINY_SPACE["model.hidden_3"]
    for key, (searched, how) in [
        ("train.lr", ({"choices": [0.5, 1.0]}, "choices [1.0, 1e-05], now choices [0.5, 1.0]")),
        ("train.lr", ({"low": 0.1, "high": 1.0}, "choices [1.0, 1e-05], now numbers [0.1, 1.0]")),
        ("model.hidden_3", ({**hidden_3, "log": False}, "integers [16, 32] log, now integers [16, 32]")),
    ]:
        write_tune_params(project.params_file, n_trials=2, epochs=1, pruner="none", space={**TINY_SPACE, key: searched})
        code, err = run_tune_cli(project, capsys)
        assert code == 2
        assert err == (
            f"error: tune.space.{key}: the study 'mnist-cnn' was made with another search space ({how});"
            " use a new tune.study_name"
        )
        assert_untouched(project, parent, journal_bytes)

    # A moved range is what Optuna allows: the study goes on with it.
    moved = {**TINY_SPACE, "model.hidden_3": {**hidden_3, "low": 8, "high": 64}}
    write_tune_params(project.params_file, n_trials=2, epochs=1, pruner="none", space=moved)
    code, err = run_tune_cli(project, capsys)
    assert code == 0, err
    assert [t.state for t in journal(project.root).get_trials()] == [TrialState.COMPLETE] * 2


def test_a_worker_with_another_space_is_refused_before_the_first_worker_records_a_trial(project, capsys, monkeypatch):
    """Two workers started at once: the second finds the study the first made, with no trial in it yet."""

    def first_worker_stops_at_its_first_trial(*args, **kwargs):
        raise KeyboardInterrupt

    write_tune_params(project.params_file, n_trials=2, epochs=1, pruner="none", space=TINY_SPACE)
    with monkeypatch.context() as patch:
        patch.setattr(optuna.Study, "ask", first_worker_stops_at_its_first_trial)
        code, _ = run_tune_cli(project, capsys)
    assert code == 130 and journal(project.root).get_trials() == []

    other = {**TINY_SPACE, "train.lr": {"low": 0.1, "high": 1.0}}
    write_tune_params(project.params_file, n_trials=2, epochs=1, pruner="none", space=other)
    code, err = run_tune_cli(project, capsys)
    assert (code, err) == (
        2,
        "error: tune.space.train.lr: the study 'mnist-cnn' was made with another search space"
        " (choices [1.0, 1e-05], now numbers [0.1, 1.0]); use a new tune.study_name",
    )
    assert journal(project.root).get_trials() == []


def test_a_second_ctrl_c_while_the_parent_ends_waits_and_the_parent_ends_killed(project, capsys, monkeypatch):
    import signal

    import mnist_cnn.stages.tune as tune_module

    real_fit, real_plots = tune_module.fit, tune_module._log_plots
    fits = []

    def fit(*args, **kwargs):
        fits.append(1)
        if len(fits) == 2:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C in the second trial
        return real_fit(*args, **kwargs)

    def log_plots(*args):
        signal.raise_signal(signal.SIGINT)  # and again while the parent is being ended
        real_plots(*args)

    monkeypatch.setattr(tune_module, "fit", fit)
    monkeypatch.setattr(tune_module, "_log_plots", log_plots)
    write_tune_params(project.params_file, n_trials=3, epochs=1, pruner="none")
    code, err = run_tune_cli(project, capsys)

    assert code == 130 and err.splitlines()[-1] == "interrupted"
    (parent,), children = tune_runs(project.root)
    assert parent.info.status == "KILLED"
    assert sorted(c.info.status for c in children) == ["FINISHED", "KILLED"]
    assert [t.state for t in journal(project.root).get_trials()] == [TrialState.COMPLETE, TrialState.FAIL]
    artifacts = {a.path for a in MlflowClient().list_artifacts(parent.info.run_id)}
    assert "optimization_history.png" in artifacts  # the second Ctrl-C waited for the end of the parent
    assert (project.root / "reports" / "best_params.yaml").is_file()
