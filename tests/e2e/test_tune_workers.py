"""Two tune workers (real processes) on one study, and the tune pipeline through the real DVC CLI."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import yaml
from optuna.trial import TrialState

from conftest import REPO, dvc
from mnist_cnn.stages.tune import OWNER_ATTR
from tune_helpers import check_study_and_runs, journal, write_tune_params


def test_two_workers_share_one_study_and_one_parent_run(project):
    # Enough work that neither worker can finish the study while the other still starts (seen with 4
    # one-epoch trials under a busy suite: one worker ran all four): 6 trials of 3 epochs, about 3x the
    # CPU of a worker's start-up.
    n_trials, epochs = 6, 3
    write_tune_params(project.params_file, n_trials=n_trials, epochs=epochs, pruner="none")
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

    study, parent = check_study_and_runs(project.root, n_trials=n_trials, epochs=epochs)
    assert parent_ids == {parent.info.run_id}
    assert study.user_attrs["mnist_cnn.workers"] == 2 and study.user_attrs["mnist_cnn.active_workers"] == []
    assert all(OWNER_ATTR in t.user_attrs for t in study.get_trials())
    writers = [err.count("written to reports/best_params.yaml") for _, err in outputs]
    assert sorted(writers) == [0, 1], "the best params are written once, by the worker that finishes last"


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
