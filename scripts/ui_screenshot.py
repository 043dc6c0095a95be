#!/usr/bin/env python
"""Screenshot the MLflow run page of the latest run of an experiment, as a small PNG for the docs.

    .venv/bin/python scripts/ui_screenshot.py                      # ./mlflow.db -> docs/mlflow-run.png
    .venv/bin/python scripts/ui_screenshot.py --store sqlite:////path/mlflow.db --out /tmp/run.png
    .venv/bin/python scripts/ui_screenshot.py --store http://127.0.0.1:5000   # a running server

A SQLite (or other database) store gets its own ``mlflow server`` on a free port for the duration; an
http(s) store is used as it is. Needs the dev extras (Playwright) and Chromium (``apt-get install
chromium``, or ``$CHROMIUM``).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

from mlflow.tracking import MlflowClient
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the UI driver is a test helper
import ui_driver as ui  # noqa: E402
from mnist_cnn.tracking.store import tracking_uri

TIMEOUT_MS = 90_000


def latest_run(store: str, experiment: str):
    client = MlflowClient(store, store)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise SystemExit(f"error: no experiment {experiment!r} in {store}")
    # The latest evaluated training: not a predict run, nor one still training.
    runs = client.search_runs(
        [found.experiment_id], "metrics.test_acc >= 0", order_by=["attributes.start_time DESC"], max_results=1
    )
    if not runs:
        raise SystemExit(f"error: experiment {experiment!r} has no evaluated run in {store}")
    return runs[0]


def shrink(path: Path) -> None:
    """A UI has few colours: a 256-colour palette keeps it sharp at a fraction of the size."""
    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)


def screenshot(store: str, out: Path, experiment: str = "mnist-cnn") -> Path:
    run = latest_run(store, experiment)
    with contextlib.ExitStack() as stack:
        if store.startswith(("http://", "https://")):
            url = store.rstrip("/")
        else:
            log = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "server.log"
            url = stack.enter_context(ui.mlflow_server(store, log))
        page = stack.enter_context(ui.browser_page())
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(ui.run_url(url, run.info.experiment_id, run.info.run_id))
        page.get_by_text("Parameters (").first.wait_for()
        ui.close_assistant(page)
        page.get_by_text(run.info.run_name).first.wait_for()
        page.wait_for_timeout(1000)  # charts and badges settle after the text
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=out)
    shrink(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=None, help="tracking URI (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    parser.add_argument("--out", type=Path, default=Path("docs/mlflow-run.png"))
    parser.add_argument("--experiment", default="mnist-cnn")
    args = parser.parse_args(argv)
    store = args.store or tracking_uri()
    out = screenshot(store, args.out, args.experiment)
    print(f"{out}: {out.stat().st_size // 1024} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
