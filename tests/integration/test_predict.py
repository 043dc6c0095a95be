"""``predict`` on image files with the shared champion: every variant of a digit predicted alike, and bad
files, names and models reported one line each through the real CLI while the good ones are still
predicted. Two tests run it as a child process, as a user does (its exit code, what reaches its stderr,
a store it must not create); the rest call the same entry point, ``cli.main``, in process."""

from __future__ import annotations

import importlib.util
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

from conftest import new_store
from mnist_cnn.cli import main
from mnist_cnn.core.images import MAX_PIXELS, load_digit, mnist_like
from mnist_cnn.stages.predict import predict


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
    """``python -m mnist_cnn predict ARGS`` as a child process."""
    return subprocess.run(
        [sys.executable, "-m", "mnist_cnn", "predict", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def predict_cli(capsys, *args) -> subprocess.CompletedProcess:
    """The same command in process (``cli.main``), against this process's store: its exit code and output."""
    capsys.readouterr()
    code = main(["predict", *map(str, args)])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


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


def test_a_directory_predicts_every_image_in_it_as_json(digits, champion_env, capsys):
    root, _ = digits
    result = predict_cli(capsys, "--json", root / "big")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    files = sorted((root / "big").iterdir())
    assert [row["file"] for row in rows] == [str(path) for path in files]
    assert [row["digit"] for row in rows] == [r.digit for r in predict(files)]
    assert all(abs(sum(row[f"p{k}"] for k in range(10)) - 1) < 1e-4 for row in rows)
    assert all(row["probability"] == max(row[f"p{k}"] for k in range(10)) for row in rows)


def test_an_unknown_model_is_one_line_and_exit_1(digits, champion_env, capsys):
    root, _ = digits
    result = predict_cli(capsys, root / "raw" / "000.png", "--model-uri", "models:/no-such-model@champion")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert "no-such-model" in line


def test_json_lists_every_file_and_odd_names_cannot_break_the_table(digits, champion_env, tmp_path, capsys):
    root, _ = digits
    odd = tmp_path / "seven\n\x1b[31mred.png"  # a newline and an ANSI escape in the name
    odd.write_bytes((root / "raw" / "000.png").read_bytes())
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")

    table = predict_cli(capsys, odd, empty)
    assert table.returncode == 1 and "\x1b" not in table.stdout + table.stderr
    header, row = table.stdout.splitlines()  # the name stays on its row
    assert row.startswith(str(tmp_path / "seven\\n\\x1b[31mred.png"))

    listed = predict_cli(capsys, "--json", odd, empty)
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


def test_a_model_uri_that_is_no_model_is_one_line(digits, champion_env, capsys):
    root, _ = digits
    result = predict_cli(capsys, root / "raw" / "000.png", "--model-uri", "http://127.0.0.1:1/x")
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


@pytest.mark.parametrize("foreign", [NotADigitModel, DigitNamesModel])
def test_a_model_of_another_kind_is_one_line(digits, tmp_path, monkeypatch, foreign, store_template):
    root, _ = digits
    monkeypatch.chdir(tmp_path)  # the new store's artifacts land here
    new_store(store_template, tmp_path / "other.db")  # created: MLflow's tables, no run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'other.db'}")
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="other", python_model=foreign(), pip_requirements=[])
    with pytest.raises(RuntimeError, match=rf"^--model-uri {re.escape(info.model_uri)}: not an mnist-cnn model"):
        predict([root / "raw" / "000.png"], info.model_uri)


def test_16_bit_12_bit_and_transparent_files_predict_like_the_digit(digits, champion_env, tmp_path, capsys):
    """Through the CLI: a digit as a 16-bit black-on-white PNG, a 12-bit scan in 16 bits and white
    strokes on a transparent canvas predicts as the plain file does; a symlink loop is said as one."""
    root, images = digits
    digit = images[7]
    plain = root / "raw" / "007.png"
    Image.fromarray((255 - digit.astype(np.uint16)) * 257).save(tmp_path / "sixteen.png")
    Image.fromarray(((digit.astype(np.uint32) * 4095 + 127) // 255).astype(np.uint16)).save(tmp_path / "twelve.png")
    strokes = np.zeros((*digit.shape, 4), np.uint8)
    strokes[..., :3], strokes[..., 3] = 255, digit  # white everywhere, the digit in the alpha
    Image.fromarray(strokes, "RGBA").save(tmp_path / "white-on-clear.png")
    os.symlink(tmp_path / "loop-b.png", tmp_path / "loop-a.png")
    os.symlink(tmp_path / "loop-a.png", tmp_path / "loop-b.png")
    files = [plain, tmp_path / "sixteen.png", tmp_path / "twelve.png", tmp_path / "white-on-clear.png"]

    result = predict_cli(capsys, "--json", *files, tmp_path / "loop-a.png")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    *rows, loop = json.loads(result.stdout)
    assert loop == {
        "file": str(tmp_path / "loop-a.png"),
        "error": f"{tmp_path / 'loop-a.png'}: a symlink loop, cannot be read (Too many levels of symbolic links)",
    }
    assert [row["file"] for row in rows] == [str(path) for path in files]
    assert len({row["digit"] for row in rows}) == 1, rows
    for row in rows[1:]:
        assert row["probability"] == pytest.approx(rows[0]["probability"], abs=0.01), row


def log_sklearn_model(tmp_path, store_template, monkeypatch) -> str:
    """A real scikit-learn model logged into a store of the test's own, now this process's store: its URI.
    (Its pip requirements are given: inferring them costs MLflow a child process, and no test reads them.)"""
    from sklearn.linear_model import LogisticRegression

    new_store(store_template, tmp_path / "other.db")
    uri = f"sqlite:///{tmp_path / 'other.db'}"
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.setenv(name, uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    classifier = LogisticRegression().fit(np.random.default_rng(0).random((20, 784)), np.arange(20) % 10)
    with mlflow.start_run():
        info = mlflow.sklearn.log_model(classifier, name="digits", pip_requirements=["scikit-learn"])
    return info.model_uri


def test_a_sklearn_model_uri_is_one_line_naming_its_flavor(digits, tmp_path, monkeypatch, store_template, capsys):
    root, _ = digits
    monkeypatch.chdir(tmp_path)  # the new store's artifacts land here
    model_uri = log_sklearn_model(tmp_path, store_template, monkeypatch)
    result = predict_cli(capsys, root / "raw" / "000.png", "--model-uri", model_uri)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: --model-uri {model_uri}: not an mnist-cnn model: its flavor is sklearn"
    )
    assert not result.stdout


@pytest.mark.skipif(importlib.util.find_spec("botocore") is not None, reason="boto3 is installed here")
def test_an_s3_model_uri_without_boto3_is_one_line(digits, champion_env, capsys):
    root, _ = digits
    result = predict_cli(capsys, root / "raw" / "000.png", "--model-uri", "s3://bucket/models/digits")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --model-uri s3://bucket/models/digits: s3:// model URIs need boto3 (no module named botocore): "
        "pip install boto3"
    )
