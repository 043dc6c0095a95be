"""A stage process's start-up: its heavy modules load with Python's cyclic garbage collector paused."""

from __future__ import annotations

import contextlib
import gc
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Import torch, MLflow and the stages inside this block. Loading them makes millions of long-lived
    objects and no garbage, yet the collector runs every 700 new objects and rescans the older ones
    (measured here: about a fifth of a training process's start-up CPU, 0.7 of 3.5 s, and 0.5 of
    torch._dynamo's 1.5 s). Afterwards what was loaded is frozen out of its sight (``gc.freeze``), so
    the collections during the work skip it too (a 3-epoch training: 1.5 to 2 s less CPU).

    Freezing also keeps whatever garbage exists at that moment: harmless at start-up, a leak in a
    process that has worked for a while (the tests call ``cli.main`` in process, many times). So
    nothing is frozen when the block loaded no module, as there, where they were loaded already."""
    was_enabled = gc.isenabled()
    loaded_before = len(sys.modules)
    gc.disable()
    try:
        yield
    finally:
        if len(sys.modules) > loaded_before:
            gc.freeze()
        if was_enabled:
            gc.enable()
