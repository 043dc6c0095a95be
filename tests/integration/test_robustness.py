"""Faults made for real, in process: stale runs closed by the next training, a crash after the weights
are written, evaluate failing or repeated without rewriting history, a full or read-only disk (tmpfs and
read-only bind mounts, as root), data changed since download, file modes. The faults that need a child
process (signals, kill -9, four trainings at once) are in tests/e2e/test_kills.py."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from conftest import copy_tree_with_store, error_line, new_store, the_runs, tracked_training
from mnist_cnn.cli import main
from mnist_cnn.core.files import Paths
from mnist_cnn.stages import evaluate, train
from mnist_cnn.tracking import owners
from mnist_cnn.tracking.store import configure, experiment_id

# One worker (pytest-xdist) for the whole module: its tests share a module-scoped fixture.
pytestmark = pytest.mark.xdist_group("robustness")


def test_next_training_closes_stale_runs_of_this_machine_only(project, tiny_params):
    """A dead process's run is closed only when its owner tags prove it ran here: the same host, boot id
    and PID namespace. Another boot id (a VM image with this host name), another PID namespace (a
    container), or a run without those tags (an older version's) is unknown and stays RUNNING."""
    configure()
    exp_id = experiment_id("mnist-cnn")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    here = {**owners.owner_tags(), owners.PID_TAG: str(dead.pid)}
    del here[owners.PID_START_TAG]
    assert here[owners.HOST_TAG] == socket.gethostname()
    client = MlflowClient()
    owned = {
        "here": here,
        "another boot": {**here, owners.BOOT_TAG: "00000000-0000-0000-0000-000000000000"},
        "another namespace": {**here, owners.PID_NS_TAG: "pid:[1]"},
        "no machine tags": {owners.HOST_TAG: socket.gethostname(), owners.PID_TAG: str(dead.pid)},
    }
    runs = {name: client.create_run(exp_id, tags=tags).info.run_id for name, tags in owned.items()}
    assert {name: owners.run_is_stale(tags) for name, tags in owned.items()} == {
        "here": True,
        "another boot": None,
        "another namespace": None,
        "no machine tags": None,
    }
    train.run_train(tiny_params, project, show_progress=False)
    states = {name: client.get_run(run_id).info.status for name, run_id in runs.items()}
    assert states == {
        "here": "KILLED",
        "another boot": "RUNNING",
        "another namespace": "RUNNING",
        "no machine tags": "RUNNING",
    }


def test_a_crash_after_the_weights_are_written_resumes_with_nothing_to_train(project, tiny_params, monkeypatch):
    """The weights are on disk but the run is not fully recorded (no train.json): the checkpoint stays,
    and the rerun finishes the same run from it instead of training again in a new one."""

    def crash(*args, **kwargs):
        raise RuntimeError("killed while recording")

    write_train_info = train.write_train_info
    monkeypatch.setattr(train, "write_train_info", crash)
    stale = project.models / "train.json"  # an earlier training's, naming its run
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_text('{"run_id": "0123456789abcdef", "val_split": 0.2, "seed": 1}\n')
    with pytest.raises(RuntimeError, match="killed while recording"):
        train.run_train(tiny_params, project, show_progress=False)
    assert (project.models / "model.pt").exists() and (project.models / "checkpoint.pt").exists()
    assert not stale.exists()  # evaluate cannot file the new weights under the old run
    (crashed,) = the_runs()
    monkeypatch.setattr(train, "write_train_info", write_train_info)

    run_id, result = train.run_train(tiny_params, project, show_progress=False)
    assert run_id == crashed.info.run_id and MlflowClient().get_run(run_id).info.status == "FINISHED"
    assert result.train_seconds < crashed.data.metrics["train_seconds"] + 1.0  # nothing trained again
    assert [m.step for m in MlflowClient().get_metric_history(run_id, "val_loss")] == [1, 2]
    assert json.loads((project.models / "train.json").read_text())["run_id"] == run_id
    assert not (project.models / "checkpoint.pt").exists() and len(the_runs()) == 1


@pytest.fixture(scope="module")
def trained_template(tmp_path_factory, tiny_mirror, store_template):
    """The tiny params trained in process under umask 002 (a team's shared folder), not evaluated: read
    where it is by the umask test, copied by the tests that evaluate it (``trained``)."""
    root = tmp_path_factory.mktemp("trained")
    new_store(store_template, root / "mlflow.db")
    previous = os.umask(0o002)
    try:
        return tracked_training(root, tiny_mirror, {}, {}, {}, evaluated=False)
    finally:
        os.umask(previous)


@pytest.fixture
def trained(trained_template, tmp_path):
    """The test's copy of ``trained_template``: project at tmp_path/project, store at tmp_path/mlflow.db."""
    copy_tree_with_store(trained_template.root, tmp_path)
    return SimpleNamespace(
        paths=Paths(root=tmp_path / "project", params_file=tmp_path / "project" / "params.yaml"),
        run_id=trained_template.run_id,
    )


# 5. Evaluate does not rewrite history
def test_failed_evaluate_keeps_the_run_finished_and_the_champion(trained_project, capsys):
    """A copy of the champion's trained, evaluated and registered project (tests/conftest.py)."""
    project, run_id = trained_project.paths, trained_project.run_id
    client = MlflowClient()
    (project.models / "model.pt").write_bytes(b"PK\x03\x04 not really a zip")
    code = main(["evaluate", "--params", str(project.params_file), "--root", str(project.root)])
    err = error_line(capsys.readouterr().err)
    assert code == 1 and "model.pt: not a readable weights file" in err and "weights_only" not in err
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert (
        run.data.tags["evaluate.status"] == "FAILED"
        and "not a readable weights file" in run.data.tags["evaluate.error"]
    )
    assert client.get_model_version_by_alias("mnist-cnn", "champion").run_id == run_id


def test_evaluating_the_same_weights_again_registers_no_new_version(trained_project):
    """The champion's project (trained, evaluated once: version 1) evaluated again."""
    project, run_id = trained_project.paths, trained_project.run_id
    evaluate.run_evaluate(trained_project.params, project)
    versions = MlflowClient().search_model_versions("name = 'mnist-cnn'")
    assert [(str(v.version), v.run_id) for v in versions] == [("1", run_id)]
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["evaluate.status"] == "FINISHED"


def test_evaluate_with_another_split_than_training_is_refused(trained, capsys):
    project, run_id = trained.paths, trained.run_id
    args = ["evaluate", "--params", str(project.params_file), "--root", str(project.root)]
    assert main([*args, "--val_split", "0.3"]) == 1
    err = error_line(capsys.readouterr().err)
    assert err.startswith("error: train.val_split = 0.3, but the weights were trained with 0.2")
    assert "overlap the training data" in err
    run = MlflowClient().get_run(run_id)
    assert "final_val_acc" not in run.data.metrics and run.info.status == "FINISHED"
    assert not (project.reports / "metrics.json").exists()


# 7. One line, not a traceback
def mount_or_skip(*args: str) -> None:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root and mount(8) to make a full or read-only file system")
    result = subprocess.run(["mount", *args], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"mount refused here: {result.stderr.strip()}")


@pytest.fixture
def mounted():
    points = []
    yield points
    for point in reversed(points):
        subprocess.run(["umount", "-l", str(point)], check=False)


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_full_or_read_only_reports_dir_is_one_line_and_leaves_nothing(trained, fault, mounted, capsys):
    project = trained.paths
    reports = project.reports
    shutil.rmtree(reports)
    reports.mkdir()
    if fault == "full":
        mount_or_skip("-t", "tmpfs", "-o", "size=16k", "tmpfs", str(reports))
        mounted.append(reports)
        (reports / "filler").write_bytes(b"\0" * 12_000)
    else:
        mount_or_skip("--bind", str(reports), str(reports))
        mounted.append(reports)
        mount_or_skip("-o", "remount,ro,bind", str(reports))
    code = main(["evaluate", "--params", str(project.params_file), "--root", str(project.root)])
    err = error_line(capsys.readouterr().err)
    assert code == 1
    reason = "No space left on device" if fault == "full" else "Read-only file system"
    assert err.startswith(f"error: {reports}/") and f"cannot write ({reason})" in err
    assert sorted(p.name for p in reports.iterdir()) == (["filler"] if fault == "full" else [])


# 8. Data changed after download
def test_stage_run_directly_refuses_data_changed_since_download(project, capsys):
    images = project.data / "train-images-idx3-ubyte.gz"
    blob = bytearray(images.read_bytes())
    blob[-10] ^= 0xFF
    images.write_bytes(bytes(blob))
    code = main(["train", "--params", str(project.params_file), "--root", str(project.root)])
    err = error_line(capsys.readouterr().err)
    assert code == 1 and err.startswith(f"error: {images}: MD5 ") and "changed since download" in err
    assert the_runs() == [] and not (project.models / "model.pt").exists()


# 9. Files a teammate can read
def test_outputs_follow_the_umask(trained_template):
    project = trained_template.paths  # trained under umask 002
    for path in (project.models / "model.pt", project.models / "train.json", project.reports / "history.csv"):
        assert path.stat().st_mode & 0o777 == 0o664, path


def test_full_disk_while_training_is_one_line_and_the_run_failed(project, mounted, capsys):
    models = project.models
    models.mkdir()
    mount_or_skip("-t", "tmpfs", "-o", "size=16k", "tmpfs", str(models))
    mounted.append(models)
    code = main(["train", "--params", str(project.params_file), "--root", str(project.root)])
    err = error_line(capsys.readouterr().err)
    assert code == 1
    assert err == f"error: {models}/checkpoint.pt: cannot write (No space left on device)"
    assert [p.name for p in models.iterdir()] == [".lock"]  # the stage lock; no partial file
    assert [run.info.status for run in the_runs()] == ["FAILED"]
