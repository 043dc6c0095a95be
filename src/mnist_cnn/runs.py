"""``mnist-cnn runs [--clean]``: the experiment's RUNNING runs, and which of them are stale.

A run is stale when the process that started it, on this host, is gone (``kill -9``, a crash, an OOM
kill). Runs of other hosts on a shared server are listed but never touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import tracking


@dataclass(frozen=True)
class RunState:
    run_id: str
    name: str
    host: str
    pid: str
    state: str  # alive | stale | unknown (another host, or not started by this project)


def running(experiment: str, root: Path | None = None) -> list[RunState]:
    tracking.configure(root)
    states, local = [], tracking.is_local_store()
    for run in tracking.running_runs([tracking.experiment_id(experiment, root)]):
        tags = run.data.tags
        stale = tracking.run_is_stale(tags, local)
        state = "unknown" if stale is None else ("stale" if stale else "alive")
        host, pid = tags.get(tracking.HOST_TAG, "?"), tags.get(tracking.PID_TAG, "?")
        states.append(RunState(run.info.run_id, run.info.run_name or "", host, pid, state))
    return states


def clean(experiment: str, root: Path | None = None) -> list[str]:
    """End the stale runs as KILLED; return their ids."""
    tracking.configure(root)
    return tracking.close_stale_runs([tracking.experiment_id(experiment, root)])
