"""The MLflow UI in a real browser: a tiny pipeline run (train, evaluate, registered, champion) served by
a real ``mlflow server`` and read back from what headless Chromium shows. Screenshots in the test's tmp dir."""

from __future__ import annotations

import importlib.util
import re
import struct
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

import ui_driver as ui
from conftest import REPO
from mnist_cnn.tracking import store

pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed (pip install -e .[dev])")
if ui.chromium_path() is None:
    pytest.skip(
        "no Chromium (apt-get install chromium, or set $CHROMIUM): the UI test needs a real browser",
        allow_module_level=True,
    )

TIMEOUT_MS = 60_000  # the first page load compiles MLflow's JavaScript bundle on 2 busy cores


def png_width(data: bytes) -> int:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">I", data[16:20])[0]


@pytest.fixture
def served_run(named_run, tmp_path, monkeypatch):
    """A finished, evaluated and registered run (champion) and a server on its store; (url, run). The
    run is ``train --lr 0.2`` then ``evaluate``, system metrics sampled every 0.2 s (tests/conftest.py:
    named_run, read where it is)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", named_run.uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", named_run.uri)
    with ui.mlflow_server(store.tracking_uri(), tmp_path / "server.log") as url:
        yield url, MlflowClient(named_run.uri, named_run.uri).get_run(named_run.run_id)


def text_of(page) -> str:
    return page.inner_text("body")


def test_ui_shows_the_run_its_params_curve_artifact_and_champion(served_run, tmp_path):
    url, run = served_run
    exp_id, run_id, name = run.info.experiment_id, run.info.run_id, run.info.run_name
    assert name == "train lr=0.2"
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with ui.browser_page() as page:
        page.set_default_timeout(TIMEOUT_MS)

        # The runs table of experiment mnist-cnn lists the run by its name, with its datasets.
        page.goto(ui.runs_url(url, exp_id))
        page.get_by_role("link", name=name).first.wait_for()
        ui.close_assistant(page)
        assert "mnist-cnn" in text_of(page)
        page.get_by_text(re.compile(r"mnist \([0-9a-f]{12}\)")).first.wait_for()
        page.screenshot(path=shots / "runs.png")

        # The run page: its description, parameters and system metrics.
        page.goto(ui.run_url(url, exp_id, run_id))
        page.get_by_text("Parameters (").first.wait_for()
        shown = text_of(page)
        assert re.search(r"Test accuracy \d+\.\d\d%", shown), shown
        assert re.search(r"train\.lr\s+0\.2\b", shown) and re.search(r"model\.hidden_3\s+16\b", shown), shown
        assert re.search(r"device\s+cpu\b", shown) and "system/cpu_utilization_percentage" in shown, shown
        page.screenshot(path=shots / "run.png", full_page=True)

        # val_loss: the chart draws one point per epoch, and its data (as the page downloads it) says which.
        page.goto(ui.metric_url(url, exp_id, run_id, "val_loss"))
        points = page.locator(".scatterlayer .point")
        points.first.wait_for()
        assert points.count() == 2
        with page.expect_download() as download:
            page.get_by_text("Download data").click()
        rows = download.value.path().read_text().splitlines()
        assert rows[0].startswith("run_id,key,value,step")
        assert [row.split(",")[3] for row in rows[1:]] == ["1", "2"]
        assert all(row.split(",")[1] == "val_loss" for row in rows[1:])
        page.screenshot(path=shots / "val_loss.png")

        # The artifacts tab previews confusion_matrix.png: the image the browser decoded is the logged one.
        page.goto(ui.run_url(url, exp_id, run_id, "artifacts"))
        page.get_by_text("confusion_matrix.png").first.click()
        image = page.locator('img[alt="confusion_matrix.png"]')
        image.wait_for()
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
        logged = (store.tracking_uri(), run_id)
        width = png_width(_artifact_bytes(*logged, "confusion_matrix.png"))
        assert image.evaluate("img => img.naturalWidth") == width
        assert page.get_by_text("confident_mistakes.png").count() >= 1
        page.screenshot(path=shots / "artifacts.png")

        # The registered model mnist-cnn: version 1, alias champion.
        page.goto(ui.model_url(url, "mnist-cnn"))
        page.get_by_text("Version 1").first.wait_for()
        assert page.get_by_text("champion").count() >= 1
        page.screenshot(path=shots / "model.png")
        # Version 1's page shows its model card, the Markdown rendered (headings, not "## ...").
        page.goto(f"{ui.model_url(url, 'mnist-cnn')}/versions/1")
        page.get_by_role("heading", name="Intended use and limits").wait_for()
        assert page.get_by_text("## Intended use").count() == 0
        page.screenshot(path=shots / "model_card.png")
    assert all((shots / f"{n}.png").stat().st_size > 10_000 for n in ("runs", "run", "val_loss", "artifacts", "model"))

    # scripts/ui_screenshot.py on the same server: the latest run's page, 1280x800, palette PNG.
    script = _load_script()
    out = script.screenshot(url, shots / "script" / "run.png")
    with Image.open(out) as image:
        assert image.size == (1280, 800) and image.mode == "P"
    assert out.stat().st_size < 300_000


def _load_script():
    spec = importlib.util.spec_from_file_location("ui_screenshot", REPO / "scripts" / "ui_screenshot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _artifact_bytes(store_uri: str, run_id: str, path: str) -> bytes:
    return Path(MlflowClient(store_uri).download_artifacts(run_id, path)).read_bytes()
