"""The tune stage for real, in process: Optuna on the tiny data, the real fit, a private MLflow store; a
damaged journal, another search space, Ctrl-C while the parent run ends."""

from __future__ import annotations

import optuna
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from mnist_cnn.cli import main
from mnist_cnn.core.params import load_params
from mnist_cnn.core.search import load_tune
from mnist_cnn.stages.tune import tune
from tune_helpers import TINY_SPACE, check_study_and_runs, journal, tune_runs, write_tune_params


def test_tune_runs_a_study_with_pruning_and_nested_runs(project, monkeypatch):
    import mnist_cnn.stages.tune as tune_module

    calls = {"training_and_validation": 0, "fit": 0}

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
    assert calls == {"training_and_validation": 1, "fit": 4}  # the data once per worker; the train stage's own fit
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


def test_a_diverging_trial_fails_and_the_study_goes_on(project):
    space = {"train.lr": {"choices": [1e12, 1e13]}}
    write_tune_params(project.params_file, n_trials=1, epochs=1, pruner="none", space=space)
    params = load_params(project.params_file)
    result = tune(params, load_tune(project.params_file, params), project.root, show_progress=False)
    assert result.trials_run == [0] and result.best_trial is None and not result.best_params_written
    assert [t.state for t in journal(project.root).get_trials()] == [TrialState.FAIL]
    (parent,), (child,) = tune_runs(project.root)
    assert (child.info.status, child.data.tags["optuna.state"]) == ("FAILED", "fail")
    assert parent.info.status == "FINISHED" and "best_value" not in parent.data.metrics
    assert not (project.root / "reports" / "best_params.yaml").exists()


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


REMEDY = "use a new tune.study_name, or delete the journal tune/study.journal"


def test_another_search_space_for_an_existing_study_is_one_line_before_any_change(project, capsys):
    parent = finished_study(project, space=TINY_SPACE)
    journal_bytes = (project.root / "tune" / "study.journal").read_bytes()
    hidden_3 = TINY_SPACE["model.hidden_3"]
    for key, (searched, how) in [
        ("train.lr", ({"choices": [0.5, 1.0]}, "choices [1.0, 1e-05], now choices [0.5, 1.0]")),
        ("train.lr", ({"low": 0.1, "high": 1.0}, "choices [1.0, 1e-05], now numbers [0.1, 1.0]")),
        ("model.hidden_3", ({**hidden_3, "log": False}, "integers [16, 32] log, now integers [16, 32]")),
        # A moved range too: the best so far may lie outside it, and would be written as the best again.
        ("model.hidden_3", ({**hidden_3, "low": 8, "high": 64}, "integers [16, 32] log, now integers [8, 64] log")),
    ]:
        write_tune_params(project.params_file, n_trials=2, epochs=1, pruner="none", space={**TINY_SPACE, key: searched})
        code, err = run_tune_cli(project, capsys)
        assert code == 2
        assert err == (
            f"error: tune.space.{key}: the study 'mnist-cnn' was made with another search space ({how}); {REMEDY}"
        )
        assert_untouched(project, parent, journal_bytes)

    fewer = {"train.lr": TINY_SPACE["train.lr"]}
    write_tune_params(project.params_file, n_trials=2, epochs=1, pruner="none", space=fewer)
    code, err = run_tune_cli(project, capsys)
    assert (code, err) == (
        2,
        "error: tune.space: the study 'mnist-cnn' was made with another search space (it searched"
        f" model.hidden_3, train.lr; now train.lr); {REMEDY}",
    )
    assert_untouched(project, parent, journal_bytes)


def test_other_fixed_params_for_an_existing_study_are_one_line_and_best_params_stay(project, capsys):
    """The settings that are not searched are the study's too: after train.optimizer changes, the study's
    best (trained with the old optimizer) must not be written as the best params again."""
    parent = finished_study(project, space=TINY_SPACE)
    journal_bytes = (project.root / "tune" / "study.journal").read_bytes()
    best_params = project.root / "reports" / "best_params.yaml"
    best_params.unlink()  # a rerun that went on would write it again
    for changes, differ in [
        ({"train.optimizer": "sgd"}, "train.optimizer.name = 'adadelta' (now 'sgd')"),
        ({"train.optimizer": "adamw"}, "train.optimizer.name = 'adadelta' (now 'adamw'), train.optimizer.weight_decay"),
        ({"train.batch_size": 32, "model.dropout2": 0.3}, "model.dropout2 = 0.17 (now 0.3), train.batch_size = "),
    ]:
        write_tune_params(project.params_file, n_trials=2, epochs=1, pruner="none", space=TINY_SPACE)
        code, err = run_tune_cli(project, capsys, *[f"--{k}={v}" for k, v in changes.items()])
        assert code == 2 and len(err.splitlines()) == 1, err
        assert err.startswith(f"error: the study 'mnist-cnn' was made with other params: {differ}"), err
        assert err.endswith(f"; {REMEDY}")
        assert_untouched(project, parent, journal_bytes)
        assert not best_params.exists()
    # tune.epochs is every trial's train.epochs: another value is another study too.
    code, err = run_tune_cli(project, capsys, "--tune.epochs", "2")
    assert (code, err) == (
        2,
        f"error: the study 'mnist-cnn' was made with other params: tune.epochs = 1 (now 2); {REMEDY}",
    )

    # A worker's own settings may differ (another machine, another device); a new study name starts afresh.
    code, err = run_tune_cli(project, capsys, "--train.device", "auto", "--train.resume", "never")
    assert code == 0 and journal(project.root).get_trials()[-1].number == 1, err
    code, err = run_tune_cli(project, capsys, "--train.optimizer", "sgd", "--tune.study_name", "sgd")
    assert code == 0, err
    assert "Best trial 0 of study 'sgd'" in best_params.read_text()


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
        f" (choices [1.0, 1e-05], now numbers [0.1, 1.0]); {REMEDY}",
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
