"""``predict`` on image files: MNIST-style preprocessing of PNGs of any size and colours, and bad files
reported one line each through the real CLI while the good ones are still predicted."""

from __future__ import annotations

import io
import json
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage

from mnist_cnn.core.data import load_split
from mnist_cnn.core.images import BOX, MAX_PIXELS, ImageError, load_digit, mnist_like
from mnist_cnn.stages.predict import _is_digit_table, predict
from mnist_cnn.tracking.pyfunc import load_model

INK, PAPER = np.array([20, 30, 120]), np.array([250, 240, 200])  # blue ink on cream paper


def variants(image: np.ndarray) -> dict[str, Image.Image]:
    """The same digit as a user might have it: 4x larger, black on white, in colour, all three."""
    big = Image.fromarray(image).resize((112, 112), Image.Resampling.NEAREST)
    coverage = np.asarray(big, dtype=np.float64)[..., None] / 255.0
    coloured = (PAPER + (INK - PAPER) * coverage).round().astype(np.uint8)
    return {
        "raw": Image.fromarray(image),
        "big": big,
        "inverted": Image.fromarray(255 - image),
        "rgb": Image.fromarray((PAPER + (INK - PAPER) * image[..., None] / 255.0).round().astype(np.uint8)),
        "big-inverted-rgb": Image.fromarray(coloured),
    }


@pytest.fixture(scope="module")
def digits(champion_store, tmp_path_factory):
    """The tiny test split (digits the model did not train on) written as PNG files, one directory per variant."""
    root = tmp_path_factory.mktemp("digits")
    images = load_split(champion_store.project / "data" / "raw", train=False).images.numpy()
    for i, image in enumerate(images):
        for name, picture in variants(image).items():
            (root / name).mkdir(exist_ok=True)
            picture.save(root / name / f"{i:03d}.png")
    return root, images


@pytest.fixture
def champion_env(champion_store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", champion_store.uri)
    return {**os.environ, "MLFLOW_TRACKING_URI": champion_store.uri}


def test_preprocessing_makes_digits_mnist_like(digits):
    root, images = digits
    for path in sorted((root / "big-inverted-rgb").iterdir())[:40]:
        pixels = load_digit(path)
        assert pixels.shape == (28, 28) and pixels.dtype == np.float32
        assert pixels.min() >= 0 and pixels.max() <= 255 and pixels.max() > 200  # white ink on black
        rows, cols = np.nonzero(pixels > 0.2 * 255)
        assert max(np.ptp(rows), np.ptp(cols)) + 1 in range(BOX - 1, BOX + 3)  # the 20x20 box, give or take the edge
        assert np.allclose(ndimage.center_of_mass(pixels), (13.5, 13.5), atol=0.5)  # centred by mass
        assert pixels[:2].max() < 5 and pixels[-2:].max() < 5 and pixels[:, :2].max() < 5  # a clean border


def test_variants_preprocess_like_the_raw_digit_and_predict_the_same(digits, champion_env):
    """Against the raw 28x28 digits centred the MNIST way (what ``predict`` makes of them), not the raw
    arrays as stored: those are the 8x8 digits' whole 8x8 frame scaled to 20x20, not their ink, and
    recentring moves the ink by a pixel or two, enough for the 2-epoch tiny model (85% accurate) to answer
    20% of the 297 digits differently. Every variant must preprocess to the same 28x28 to within a few grey
    levels and give the same digit for at least 99% of them. 4x is pixel replication, the same digit at 4x
    the resolution; a bicubic 4x enlargement adds sharper strokes of its own (93% agreement here)."""
    root, images = digits
    model = mlflow.pyfunc.load_model("models:/mnist-cnn@champion")
    reference = np.stack([mnist_like(image) for image in images])
    expected = model.predict(reference)["digit"].to_numpy()
    for name in ("raw", "big", "inverted", "rgb", "big-inverted-rgb"):
        files = sorted((root / name).iterdir())
        prepared = np.stack([load_digit(path) for path in files])
        assert np.abs(prepared - reference).mean() < 2.0, name  # grey levels of 255, per pixel
        results = predict(files)
        digits_found = np.array([r.digit for r in results])
        agreement = (digits_found == expected).mean()
        assert agreement >= 0.99, (name, agreement)
        assert all(0.0 < r.probability <= 1.0 and abs(sum(r.probabilities) - 1) < 1e-5 for r in results)


def bomb_png(path: Path, side: int = 20_000) -> Path:
    """A real, valid 20000x20000 grey PNG of a few hundred KB: 400 million pixels once decoded."""
    compressor = zlib.compressobj(9)
    row = bytes(side + 1)  # filter byte + black pixels
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


def run_cli(*args, env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mnist_cnn", "predict", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_bad_files_get_one_line_each_and_the_good_ones_are_still_predicted(digits, champion_env, tmp_path):
    root, _ = digits
    good = [root / "big-inverted-rgb" / "000.png", root / "raw" / "001.png"]
    whole = (root / "rgb" / "002.png").read_bytes()
    bad = {
        "not-an-image.png": b"hello, I am text\n",
        "empty.png": b"",
        "truncated.png": whole[: len(whole) // 2],
    }
    for name, body in bad.items():
        (tmp_path / name).write_bytes(body)
    Image.new("RGB", (60, 40), (240, 240, 235)).save(tmp_path / "blank.png")
    tiff = io.BytesIO()
    Image.new("L", (40, 40), 255).save(tiff, format="TIFF")
    (tmp_path / "cut.tif").write_bytes(tiff.getvalue()[:8])  # the header, then nothing: "Corrupt EXIF"
    bomb = bomb_png(tmp_path / "bomb.png")
    files = [good[0], *(tmp_path / name for name in bad), tmp_path / "blank.png", tmp_path / "cut.tif", bomb, good[1]]
    expected = {
        "not-an-image.png": "not an image",
        "empty.png": "empty file",
        "truncated.png": "truncated or corrupt image",
        "blank.png": "blank image",
        "cut.tif": "not an image Pillow can read",
        "bomb.png": f"20000x20000 pixels, more than the {MAX_PIXELS:,} allowed",
    }

    result = run_cli(*files, env=champion_env)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == len(expected), result.stderr
    assert "Warning" not in result.stderr, result.stderr  # Pillow's, about the cut TIFF's metadata
    for line, (name, fragment) in zip(errors, expected.items(), strict=True):
        assert line.startswith(f"error: {tmp_path / name}: ") and fragment in line, line
    in_process = {r.path: r for r in predict(good)}
    table = result.stdout.splitlines()
    assert table[0].split() == ["file", "digit", "probability"]
    rows = {Path(line.split()[0]): line.split()[1:] for line in table[1:]}
    assert set(rows) == set(good)
    for path, (digit, probability) in rows.items():
        assert int(digit) == in_process[path].digit
        assert float(probability) == pytest.approx(in_process[path].probability, abs=1e-4)


def test_a_directory_predicts_every_image_in_it_as_json(digits, champion_env):
    root, _ = digits
    result = run_cli("--json", root / "big", env=champion_env)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    files = sorted((root / "big").iterdir())
    assert [row["file"] for row in rows] == [str(path) for path in files]
    assert [row["digit"] for row in rows] == [r.digit for r in predict(files)]
    assert all(abs(sum(row[f"p{k}"] for k in range(10)) - 1) < 1e-4 for row in rows)
    assert all(row["probability"] == max(row[f"p{k}"] for k in range(10)) for row in rows)


def test_an_unknown_model_is_one_line_and_exit_1(digits, champion_env):
    root, _ = digits
    result = run_cli(root / "raw" / "000.png", "--model-uri", "models:/no-such-model@champion", env=champion_env)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert "no-such-model" in line


def test_blank_and_unreadable_raise_image_errors(tmp_path):
    with pytest.raises(ImageError, match="blank image"):
        mnist_like(np.full((30, 30), 7, np.float32))
    with pytest.raises(ImageError, match="no such file"):
        load_digit(tmp_path / "missing.png")
    speck = np.full((40, 40), 255, np.float32)
    speck[10, 20] = 0  # one dark pixel on white paper
    with pytest.raises(ImageError, match="the ink spans only 1x1 pixels, no digit found"):
        mnist_like(speck)
    speck[10:12, 20] = 0
    with pytest.raises(ImageError, match="1x2 pixels"):
        mnist_like(speck)
    speck[10:13, 20] = 0  # a short stroke, as narrow as a small 1
    assert mnist_like(speck).max() > 0


def test_an_animation_is_refused_not_read_at_its_first_frame(tmp_path):
    frames = [Image.new("L", (28, 28), 0), Image.new("L", (28, 28), 0)]
    frames[1].paste(255, (10, 4, 16, 24))
    frames[0].save(tmp_path / "moving.gif", save_all=True, append_images=frames[1:], duration=100)
    with pytest.raises(ImageError, match="moving.gif: 2 frames \\(an animation\\), expected one image"):
        load_digit(tmp_path / "moving.gif")
    whole = (tmp_path / "moving.gif").read_bytes()
    (tmp_path / "cut.gif").write_bytes(whole[: len(whole) * 3 // 4])
    with pytest.raises(ImageError, match="cut.gif: truncated or corrupt image"):
        load_digit(tmp_path / "cut.gif")
    frames[1].save(tmp_path / "still.gif")
    assert load_digit(tmp_path / "still.gif").max() > 0
    # A camera's JPEG with a second picture inside (MPO: a gain map, a preview) is read at its first.
    frames[1].convert("RGB").save(
        tmp_path / "phone.jpg", "MPO", save_all=True, append_images=[frames[0].convert("RGB")]
    )
    with Image.open(tmp_path / "phone.jpg") as phone:
        assert (phone.format, phone.n_frames) == ("MPO", 2)
    assert np.abs(load_digit(tmp_path / "phone.jpg") - load_digit(tmp_path / "still.gif")).max() < 40


def test_mlproject_predict_entry_point(digits, champion_env, tmp_path):
    from conftest import copy_project_files

    root, _ = digits
    copy_project_files(tmp_path)
    image = root / "big-inverted-rgb" / "000.png"
    result = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", ".", "-e", "predict", "--env-manager", "local"]
        + ["--experiment-name", "predictions", "-P", f"path={image}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=champion_env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (row,) = [line.split() for line in result.stdout.splitlines() if line.startswith(str(image))]
    assert int(row[1]) == predict([image])[0].digit


def test_json_lists_every_file_and_odd_names_cannot_break_the_table(digits, champion_env, tmp_path):
    root, _ = digits
    odd = tmp_path / "seven\n\x1b[31mred.png"  # a newline and an ANSI escape in the name
    odd.write_bytes((root / "raw" / "000.png").read_bytes())
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")

    table = run_cli(odd, empty, env=champion_env)
    assert table.returncode == 1 and "\x1b" not in table.stdout + table.stderr
    header, row = table.stdout.splitlines()  # the name stays on its row
    assert row.startswith(str(tmp_path / "seven\\n\\x1b[31mred.png"))

    listed = run_cli("--json", odd, empty, env=champion_env)
    assert listed.returncode == 1
    rows = json.loads(listed.stdout)
    assert [row["file"] for row in rows] == [str(odd), str(empty)]
    assert "digit" in rows[0] and rows[1] == {
        "file": str(empty),
        "error": f"{empty}: empty file, expected a PNG or JPEG image",
    }


def test_no_store_here_is_said_without_creating_one(digits, tmp_path):
    root, _ = digits
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    result = subprocess.run(
        [sys.executable, "-m", "mnist_cnn", "predict", str(root / "raw" / "000.png")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        f"error: models:/mnist-cnn@champion: no MLflow store at {tmp_path / 'mlflow.db'}; "
        "run in the project directory or set MLFLOW_TRACKING_URI"
    )
    assert not list(tmp_path.iterdir())


def test_an_empty_store_file_is_said_and_left_empty(tmp_path, monkeypatch):
    store = tmp_path / "mlflow.db"
    store.touch()  # e.g. left by a tool that crashed before writing: opening it would fill it with tables
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    with pytest.raises(RuntimeError) as caught:
        load_model("models:/mnist-cnn@champion")
    assert str(caught.value) == (
        f"models:/mnist-cnn@champion: no MLflow store at {store} (an empty file); "
        "run in the project directory or set MLFLOW_TRACKING_URI"
    )
    assert store.stat().st_size == 0


def test_a_model_uri_that_is_no_model_is_one_line(digits, champion_env):
    root, _ = digits
    result = run_cli(root / "raw" / "000.png", "--model-uri", "http://127.0.0.1:1/x", env=champion_env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: --model-uri http://127.0.0.1:1/x: ")


class NotADigitModel(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return np.zeros(len(model_input))


class DigitNamesModel(mlflow.pyfunc.PythonModel):
    """The right columns, the wrong kind: digits as words."""

    def predict(self, context, model_input, params=None):
        table = pd.DataFrame({f"p{k}": [0.1] * len(model_input) for k in range(10)})
        return table.assign(digit="seven", probability=0.1)


def test_a_digit_table_has_whole_digits_and_real_probabilities():
    table = pd.DataFrame({f"p{k}": [0.1, 0.1] for k in range(10)}).assign(digit=[7, 1], probability=[0.1, 0.1])
    assert _is_digit_table(table, 2)
    assert not _is_digit_table(table, 3)
    assert not _is_digit_table(table.assign(digit=pd.array([7, None], dtype="Int64")), 2)  # a missing digit
    assert not _is_digit_table(table.assign(probability=[0.1 + 1j, 0.1]), 2)
    assert not _is_digit_table(table.assign(p3=[0.1, float("nan")]), 2)
    assert not _is_digit_table(table.assign(digit=[42, 1]), 2)  # not a digit
    assert not _is_digit_table(table.assign(p3=[0.1, float("inf")]), 2)
    assert not _is_digit_table(table.assign(probability=[True, False]), 2)


@pytest.mark.parametrize("foreign", [NotADigitModel, DigitNamesModel])
def test_a_model_of_another_kind_is_one_line(digits, tmp_path, monkeypatch, foreign):
    root, _ = digits
    monkeypatch.chdir(tmp_path)  # the new store's artifacts land here
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'other.db'}")
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="other", python_model=foreign(), pip_requirements=[])
    with pytest.raises(RuntimeError, match=rf"^--model-uri {re.escape(info.model_uri)}: not an mnist-cnn model"):
        predict([root / "raw" / "000.png"], info.model_uri)
