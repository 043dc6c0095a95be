"""How the command line shows an error: the project's own errors as one line and their exit code, a bug
in the code with its whole traceback (cli.shown_errors is the one place that decides)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mnist_cnn import cli
from mnist_cnn.core.data import DataError
from mnist_cnn.core.errors import ProjectError, exit_code, is_user_facing
from mnist_cnn.core.params import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_project_errors_are_one_line_with_their_exit_code(capsys):
    def fails(exc):
        def body():
            raise exc

        return body

    assert cli.shown_errors(fails(ConfigError("params.yaml: train.lr = -1.0: expected a number > 0"))) == 2
    assert capsys.readouterr().err == "error: params.yaml: train.lr = -1.0: expected a number > 0\n"
    assert cli.shown_errors(fails(DataError("data/raw/x.gz: not found\n  (second line)"))) == 1
    assert capsys.readouterr().err == "error: data/raw/x.gz: not found\n"


@pytest.mark.parametrize(
    "bug",
    [ZeroDivisionError("division by zero"), RuntimeError("mat1 and mat2 shapes cannot be multiplied"), OSError(5, "x")],
)
def test_a_plain_exception_is_a_bug_and_keeps_its_traceback(bug):
    """RuntimeError and OSError used to be shown as one line whatever raised them; now only the project's
    own errors are."""
    assert not is_user_facing(bug)

    def body():
        raise bug

    with pytest.raises(type(bug)) as raised:
        cli.shown_errors(body)
    assert raised.value is bug


def test_a_shape_bug_inside_a_stage_leaves_main_with_its_traceback(tmp_path, monkeypatch):
    """A real torch error raised inside the train stage propagates out of ``main`` (Python then prints its
    traceback), never an ``error:`` line that hides where it came from."""
    import mnist_cnn.stages.train as train_stage

    def broken_run_train(*args, **kwargs):
        return torch.zeros(2, 3) @ torch.zeros(2, 3)

    monkeypatch.setattr(train_stage, "run_train", broken_run_train)
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied") as raised:
        cli.main(["train", "--no-progress"])
    assert raised.traceback[-1].name == "broken_run_train"


def test_outside_engines_register_their_user_facing_errors():
    """MLflow's refusals (tracking imports it) and a torch.distributed peer gone (core/distributed.py)."""
    from mlflow.exceptions import MlflowException

    import mnist_cnn.core.distributed  # noqa: F401
    import mnist_cnn.tracking  # noqa: F401

    assert is_user_facing(MlflowException("Permission denied"))
    assert is_user_facing(torch.distributed.DistBackendError("Connection closed by peer"))
    assert exit_code(ProjectError("x")) == 1 and exit_code(ConfigError("x")) == 2
