"""Where the store is (no store is opened), a hang-up while a run ends (a real signal, raised in
process), and what the tests assume of their tiny params."""

from __future__ import annotations

import signal

import pytest

from conftest import TINY_OVERRIDES
from mnist_cnn.ops import signals
from mnist_cnn.tracking import store


def test_a_hangup_while_a_run_ends_is_held_to_the_end():
    """A torchrun agent passes the terminal's SIGHUP on to workers that already got it: the second must
    not cut ending the run short."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)  # a terminal's, whatever the test runner's is
    try:
        steps = []
        with signals.stop_signals_interrupt():  # as cli.main runs every stage
            with pytest.raises(KeyboardInterrupt), signals.signals_deferred():
                signal.raise_signal(signal.SIGHUP)
                steps.append("run ended")
        assert steps == ["run ended"]
    finally:
        signal.signal(signal.SIGHUP, previous)


class RaisesInItsFinalizer:
    """A finalizer that a stop signal interrupts: Python drops the exception raised inside it."""

    def __del__(self):
        signal.raise_signal(signal.SIGTERM)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped exception
def test_a_stop_signal_lost_in_a_finalizer_is_raised_at_the_next_epoch_and_forgotten_after_the_block():
    with signals.stop_signals_interrupt():
        RaisesInItsFinalizer()  # refcount 0: its __del__ runs here, SIGTERM's KeyboardInterrupt is dropped
        with pytest.raises(KeyboardInterrupt, match=f"signal {signal.SIGTERM}"):
            signals.raise_if_stopped()
    signals.raise_if_stopped()  # the block is over: nothing left to raise


def test_store_defaults_to_project_root_and_survives_dvc_temp_dirs(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert store.tracking_uri(tmp_path) == f"sqlite:///{tmp_path}/mlflow.db"
    temp_copy = tmp_path / ".dvc" / "tmp" / "exps" / "tmpabc123"
    temp_copy.mkdir(parents=True)
    assert store.project_root(temp_copy) == tmp_path
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///rel.db")
    assert store.tracking_uri() == f"sqlite:///{tmp_path}/rel.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://store.example:5000")
    assert store.tracking_uri() == "http://store.example:5000"


def test_tiny_overrides_are_what_the_tests_assume():
    assert TINY_OVERRIDES["train.epochs"] == 2
