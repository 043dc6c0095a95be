"""``train.processes`` that cannot run here is refused by the stage (a child process) before torchrun starts."""

from __future__ import annotations

import pytest

from conftest import stage, the_runs, write_tiny_params


@pytest.mark.parametrize(
    ("settings", "code", "message"),
    [
        ({"train.processes": 1000}, 2, "train.processes = 1000: expected at most "),
        ({"train.processes": 2, "train.device": "mps"}, 1, "train.device = 'mps': no such device on this machine"),
    ],
)
def test_impossible_process_counts_and_devices_are_refused_before_torchrun_starts(project, settings, code, message):
    write_tiny_params(project.params_file, **settings)
    proc = stage(project, "train")
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == code, output
    assert output.strip().splitlines() == [output.strip().splitlines()[0]] and message in output
    assert "torch.distributed.run" not in output and not the_runs()
