"""A download killed (SIGKILL) or interrupted (SIGINT, SIGTERM) mid-file, in a child process, by a real
signal: nothing partial is left in data/raw, and a rerun completes."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from conftest import REPO
from mirror_servers import mirror_handler, serving, trickle_handler, wait_for
from mnist_cnn.core.data import FILES
from mnist_cnn.stages import download


# SIGTERM: the CLI turns it into KeyboardInterrupt, as Ctrl-C (SIGINT) is, so both clean up.
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM], ids=["SIGKILL", "SIGINT", "SIGTERM"])
def test_download_stopped_mid_file_leaves_nothing_in_the_output(tiny_mirror, tmp_path, sig):
    root = tmp_path / "project"
    raw = root / "data" / "raw"
    partial = download.partial_dir(raw)
    command = [
        sys.executable,
        "-m",
        "mnist_cnn",
        "download",
        "--params",
        str(REPO / "params.yaml"),
        "--root",
        str(root),
    ]
    # The burst fills more than the writer's buffer, so the partial file on disk proves the download is mid-file.
    with serving(trickle_handler(tiny_mirror, burst=20000)) as slow:
        proc = subprocess.Popen([*command, "--mirror", slow], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            started = wait_for(lambda: any(p.stat().st_size > 0 for p in partial.iterdir()), 30)
            assert started, "the download never got under way"
            proc.send_signal(sig)
            _, stderr = proc.communicate(timeout=60)  # a loaded 2-core machine needs seconds to import and unwind
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert list(raw.iterdir()) == [], "data/raw (a DVC output) holds a partial file"
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
        assert partial.is_dir()  # no chance to clean up; the next run does
    else:
        assert proc.returncode == 130 and stderr.strip().splitlines()[-1] == "interrupted"
        assert not partial.exists()
    with serving(mirror_handler(tiny_mirror)) as good:
        rerun = subprocess.run([*command, "--mirror", good], capture_output=True, text=True, timeout=60)
    assert rerun.returncode == 0, rerun.stderr
    assert sorted(p.name for p in raw.iterdir()) == sorted(FILES.values())
    assert not partial.exists()
