"""core/startup.py: the collector is paused while modules load, and only what a block loaded is frozen."""

from __future__ import annotations

import gc
import importlib
import sys

from mnist_cnn.core import startup


def test_a_block_that_loads_nothing_freezes_nothing_and_restores_the_collector():
    frozen = gc.get_freeze_count()
    with startup.collector_paused():
        assert not gc.isenabled()
        import os  # noqa: F401  (loaded long ago)
    assert gc.get_freeze_count() == frozen and gc.isenabled()


def test_a_block_that_loads_a_module_freezes_it(tmp_path, monkeypatch):
    (tmp_path / "freshly_loaded.py").write_text("TABLE = [{'row': i} for i in range(1000)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    frozen = gc.get_freeze_count()
    try:
        with startup.collector_paused():
            module = importlib.import_module("freshly_loaded")
        assert gc.get_freeze_count() > frozen and gc.isenabled()
        assert all(obj is not module.TABLE for obj in gc.get_objects())  # out of the collector's sight
    finally:
        sys.modules.pop("freshly_loaded", None)


def test_the_collector_stays_off_if_it_was_off():
    gc.disable()
    try:
        with startup.collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
