"""The champion's logged model in process: it checks its own input, and it loads without ``src/``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from mnist_cnn.core.payload import MAX_IMAGES, png_base64, uint8_base64


def test_the_model_checks_its_input_itself(champion):
    """Bad input in any form is an MlflowException with INVALID_PARAMETER_VALUE (the scoring server's 400)
    and one line (the forms' own checks: tests/unit/test_payload.py); each compact form answers as the
    pixels do, through pyfunc with its params."""
    pixels, model, expected = champion.pixels, champion.model, champion.expected
    python_model = model.unwrap_python_model()
    bad = {
        "shape (1, 27, 27)": np.zeros((1, 27, 27), np.float32),
        "empty input: no images": np.zeros((0, 28, 28), np.float32),
        "image 1 holds NaN": np.stack([pixels[0], np.full((28, 28), np.nan)]).astype(np.float32),
        "dtype bool (booleans), expected numbers": pixels[:2] > 127,
        "image 0 has values from 0 to 1, pixels scaled to 0-1": (pixels[:1] > 127).astype(np.float32),
        "uint8_base64[0]: not valid base64": {"uint8_base64": "%%%"},
        f"pixels: {MAX_IMAGES + 1:,} images in one call": np.zeros((MAX_IMAGES + 1, 28, 28), np.float32),
    }
    for fragment, pixels_in in bad.items():
        with pytest.raises(MlflowException, match=re.escape(fragment)) as caught:
            python_model.predict(None, pixels_in)
        assert caught.value.error_code == "INVALID_PARAMETER_VALUE"
        assert "\n" not in caught.value.message
    with pytest.raises(MlflowException, match="expected raw pixels in 0-255"):
        model.predict(np.full((2, 28, 28), 1000, np.float32))
    with pytest.raises(MlflowException, match=re.escape("png_base64[0]: blank image")):
        model.predict(pd.DataFrame({"png_base64": [png_base64(np.zeros((28, 28)))]}), params={"preprocess": True})
    # What stays accepted: an all-black image (raw pixels, not 0-1 ones), uint8 as MNIST stores them, and
    # the compact forms, which answer as the pixels do.
    black = model.predict(np.zeros((1, 28, 28), np.float32))
    assert len(black) == 1 and 0 <= black["digit"][0] <= 9
    digits = expected["digit"].tolist()[:20]
    assert python_model.predict(None, pixels[:20])["digit"].tolist() == digits
    assert model.predict({"uint8_base64": uint8_base64(pixels[:20])})["digit"].tolist() == digits
    pngs = pd.DataFrame({"png_base64": [png_base64(image) for image in pixels[:20]]})
    assert model.predict(pngs)["digit"].tolist() == digits
    assert model.predict(pngs, params={"preprocess": False})["digit"].tolist() == digits


def test_the_logged_model_loads_without_the_source_checkout(champion):
    """The package is logged with the model (code_paths): it loads and predicts with ``src/`` off sys.path."""
    local = champion.local
    script = (
        "import sys, numpy as np, mlflow\n"
        "sys.path = [p for p in sys.path if not p.rstrip('/').endswith('/src')]\n"
        "assert 'mnist_cnn' not in sys.modules\n"
        f"model = mlflow.pyfunc.load_model({local!r})\n"
        "import mnist_cnn\n"
        "print(mnist_cnn.__file__)\n"
        f"print(model.predict(np.load({local!r} + '/../pixels.npy'))['digit'].tolist())\n"
    )
    np.save(os.path.join(local, "..", "pixels.npy"), champion.pixels[:20].astype(np.float32))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    where, digits = result.stdout.strip().splitlines()[-2:]
    assert where.startswith(os.path.join(local, "code", "mnist_cnn")), where
    assert json.loads(digits) == champion.expected["digit"].tolist()[:20]


def test_the_registered_model_carries_its_onnx_export_and_answers_through_onnx_runtime_as_torch_does(
    champion, monkeypatch
):
    import mlflow

    assert champion.model.unwrap_python_model().engine == "onnxruntime"
    assert (Path(champion.local) / "artifacts" / "model.onnx").is_file()
    monkeypatch.setenv("MNIST_CNN_ENGINE", "torch")  # the fallback (as for a version without the export)
    with_torch = mlflow.pyfunc.load_model(champion.local)
    assert with_torch.unwrap_python_model().engine == "torch"
    answer = with_torch.predict(champion.pixels.astype(np.float32))
    assert answer["digit"].tolist() == champion.expected["digit"].tolist()
    probabilities = [f"p{k}" for k in range(10)]
    assert np.abs(answer[probabilities].to_numpy() - champion.expected[probabilities].to_numpy()).max() < 1e-5
