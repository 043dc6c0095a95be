"""Run ownership across PID namespaces, for real: a training started in a second PID namespace with the same
host name (what a container or a VM image looks like from a shared store) is never taken for a stale run
of this namespace, alive or killed; a run of this namespace whose process is gone still is."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import psutil
import pytest
from mlflow.tracking import MlflowClient

from conftest import EPOCH_LINE, the_runs, wait_for_line, write_tiny_params
from mnist_cnn.cli import main
from mnist_cnn.tracking import owners

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="a new PID namespace (unshare --pid) needs root"),
    pytest.mark.skipif(shutil.which("unshare") is None, reason="unshare (util-linux) is not installed"),
]


def train_in_new_pid_namespace(project) -> subprocess.Popen:
    """``train`` as pid 1 of a new PID namespace (its own /proc), same host name, same files and store."""
    write_tiny_params(project.params_file, **{"train.epochs": 500, "train.patience": 500})
    command = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]
    command += [sys.executable, "-u", "-m", "mnist_cnn", "train", "--no-progress"]
    return subprocess.Popen(command, cwd=project.root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def the_training(unshare: subprocess.Popen) -> psutil.Process:
    """The training process as this namespace sees it: unshare's child, verified by its command line."""
    (child,) = psutil.Process(unshare.pid).children()
    assert "mnist_cnn" in child.cmdline() and "train" in child.cmdline(), child.cmdline()
    return child


def runs_clean(project, capsys) -> str:
    capsys.readouterr()
    assert main(["runs", "--clean", "--params", str(project.params_file), "--root", str(project.root)]) == 0
    return capsys.readouterr().out


def test_a_run_of_another_pid_namespace_is_unknown_and_never_closed(project, capsys):
    unshare = train_in_new_pid_namespace(project)
    try:
        wait_for_line(unshare, EPOCH_LINE.format(epoch=1))
        (run,) = the_runs()
        tags = run.data.tags
        assert tags[owners.PID_TAG] == "1"  # its own namespace's pid: here, pid 1 is another (live) process
        assert tags[owners.HOST_TAG] == owners.machine()[owners.HOST_TAG]
        assert tags[owners.BOOT_TAG] == owners.machine()[owners.BOOT_TAG]
        assert tags[owners.PID_NS_TAG] != owners.machine()[owners.PID_NS_TAG]

        out = runs_clean(project, capsys)
        assert "closed 0 stale run(s)" in out and f"{run.info.run_id}  unknown" in out, out
        assert MlflowClient().get_run(run.info.run_id).info.status == "RUNNING"
        assert "mnist_cnn.closed" not in MlflowClient().get_run(run.info.run_id).data.tags

        the_training(unshare).send_signal(signal.SIGKILL)  # pid 1 of its namespace: the namespace ends
        unshare.communicate(timeout=60)
        # Gone, but nothing here can prove it: its pid was a pid of a namespace this process cannot see.
        out = runs_clean(project, capsys)
        assert "closed 0 stale run(s)" in out and f"{run.info.run_id}  unknown" in out, out
        assert MlflowClient().get_run(run.info.run_id).info.status == "RUNNING"
    finally:
        if unshare.poll() is None:
            unshare.kill()  # --kill-child: the training goes with it
            unshare.communicate(timeout=60)
