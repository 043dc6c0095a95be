"""The champion behind the real ``mlflow models serve`` (a subprocess on a loopback port): digits and
probabilities for MLflow's three JSON input formats, 4xx answers for bad input, and nothing left running."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import psutil
import pytest
import requests
from mlflow.exceptions import MlflowException

from mnist_cnn.core.data import load_split
from mnist_cnn.ops.scoring import scoring_server
from mnist_cnn.tracking.pyfunc import OUTPUT_COLUMNS, PROBABILITY_COLUMNS

CHAMPION = "models:/mnist-cnn@champion"


@pytest.fixture(scope="module")
def champion(champion_store):
    """The shared tiny champion loaded in-process, and its answer for the tiny test split (digits it did
    not train on)."""
    model = mlflow.pyfunc.load_model(str(champion_store.local))
    test = load_split(champion_store.project / "data" / "raw", train=False)
    pixels = test.images.numpy()  # uint8, 0-255: what a client sends
    return SimpleNamespace(
        uri=champion_store.uri,
        pixels=pixels,
        labels=test.labels.numpy(),
        expected=model.predict(pixels.astype(np.float32)),
        model=model,
        local=str(champion_store.local),
    )


@pytest.fixture(scope="module")
def server(champion, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-log") / "scoring-server.log"
    with scoring_server(
        CHAMPION, env={**os.environ, "MLFLOW_TRACKING_URI": champion.uri, "MLFLOW_REGISTRY_URI": champion.uri}, log=log
    ) as url:
        yield url
    port = url.rsplit(":", 1)[1]
    left = [p.info for p in psutil.process_iter(["pid", "cmdline"]) if port in " ".join(p.info["cmdline"] or [])]
    assert not left, f"still running after stop: {left}"


def post(url: str, body) -> requests.Response:
    data = body if isinstance(body, str) else json.dumps(body)
    return requests.post(f"{url}/invocations", data=data, headers={"Content-Type": "application/json"}, timeout=120)


def bodies(pixels: np.ndarray) -> dict[str, dict]:
    """The same images in each JSON format MLflow's scoring server documents."""
    return {
        "inputs": {"inputs": pixels.tolist()},
        "instances": {"instances": pixels.tolist()},
        # One column holding each image's 784 pixels, row by row: the signature reshapes it to 28x28.
        "dataframe_split": {
            "dataframe_split": {"columns": ["pixels"], "data": [[image.ravel().tolist()] for image in pixels]}
        },
    }


def test_served_champion_answers_digits_and_probabilities_in_each_format(champion, server):
    expected = champion.expected
    for name, body in bodies(champion.pixels).items():
        response = post(server, body)
        assert response.status_code == 200, (name, response.text[:300])
        answer = pd.DataFrame(response.json()["predictions"])
        assert list(answer.columns) == OUTPUT_COLUMNS, name
        assert np.array_equal(answer["digit"].to_numpy(), expected["digit"].to_numpy()), name
        probabilities = answer[PROBABILITY_COLUMNS].to_numpy()
        assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-5), name
        assert np.allclose(probabilities, expected[PROBABILITY_COLUMNS].to_numpy(), atol=1e-6), name
        assert np.array_equal(answer["probability"].to_numpy(), probabilities.max(axis=1)), name
    # Right digits, not only the in-process ones: the tiny model has learnt something.
    assert (expected["digit"].to_numpy() == champion.labels).mean() > 0.8


def test_ten_thousand_images_in_one_request(champion, server):
    pixels, expected = champion.pixels, champion.expected
    reps = -(-10_000 // len(pixels))
    many = np.tile(pixels, (reps, 1, 1))[:10_000]
    response = post(server, {"inputs": many.tolist()})
    assert response.status_code == 200, response.text[:300]
    digits = np.array([row["digit"] for row in response.json()["predictions"]])
    assert np.array_equal(digits, np.tile(expected["digit"].to_numpy(), reps)[:10_000])


def last_line(response: requests.Response) -> str:
    # MLflow's server puts the request's data (numpy's repr) before the model's message.
    return response.json()["message"].strip().splitlines()[-1]


def test_bad_requests_get_a_4xx_naming_the_problem_and_the_server_keeps_serving(champion, server):
    pixels, expected = champion.pixels, champion.expected
    out_of_range = pixels[:2].astype(np.int64)
    out_of_range[1, 14, 14] = 300
    negative = pixels[:1].astype(np.int64)
    negative[0, 0, 0] = -1
    nan_body = json.dumps({"inputs": [[[float("nan")] * 28] * 28]})
    cases = {
        "malformed": ("{not json", "BAD_REQUEST", "Invalid input. Ensure that input is a valid JSON"),
        "no format key": ({"pixels": pixels[:1].tolist()}, "BAD_REQUEST", "exactly one of the input fields"),
        "27x27": (
            {"inputs": np.zeros((1, 27, 27)).tolist()},
            "INVALID_PARAMETER_VALUE",
            "Shape of input (1, 27, 27) does not match expected shape (-1, 28, 28).",
        ),
        "27x27 dataframe": (
            {"dataframe_split": {"columns": ["pixels"], "data": [[[0] * 729]]}},
            "INVALID_PARAMETER_VALUE",
            "could not be converted to the expected shape of: '(-1, 28, 28)'",
        ),
        "300": (
            {"inputs": out_of_range.tolist()},
            "INVALID_PARAMETER_VALUE",
            "Error: pixels: image 1 has values from 0 to 300, expected raw pixels in 0-255",
        ),
        "negative": (
            {"instances": negative.tolist()},
            "INVALID_PARAMETER_VALUE",
            f"Error: pixels: image 0 has values from -1 to {pixels[0].max()}, expected raw pixels in 0-255",
        ),
        "NaN": (nan_body, "INVALID_PARAMETER_VALUE", "Error: pixels: image 0 holds NaN or infinity"),
    }
    for name, (body, code, message) in cases.items():
        response = post(server, body)
        assert response.status_code == 400, (name, response.status_code, response.text[:300])
        assert response.json()["error_code"] == code, name
        if code == "INVALID_PARAMETER_VALUE":
            assert message in last_line(response), (name, last_line(response))
        else:
            assert message in response.json()["message"], name
    still = post(server, {"inputs": pixels[:5].tolist()})
    assert still.status_code == 200
    assert [row["digit"] for row in still.json()["predictions"]] == expected["digit"].tolist()[:5]


def test_the_model_checks_its_input_itself(champion):
    """What the signature cannot say (range, NaN), and the shape for callers that bypass it: one line each."""
    pixels, model = champion.pixels, champion.model
    python_model = model.unwrap_python_model()
    bad = {
        "shape (1, 27, 27)": np.zeros((1, 27, 27), np.float32),
        "shape (0, 28, 28)": np.zeros((0, 28, 28), np.float32),
        "image 0 has values from 0 to 256": np.full((1, 28, 28), 256, np.float32) * (np.arange(28) > 0)[:, None],
        "image 1 holds NaN": np.stack([pixels[0], np.full((28, 28), np.nan)]).astype(np.float32),
        "expected numbers": np.array([["a"] * 28] * 28, dtype=object)[None],
    }
    for fragment, pixels_in in bad.items():
        with pytest.raises(MlflowException, match=fragment.replace("(", r"\(").replace(")", r"\)")) as caught:
            python_model.predict(None, pixels_in)
        assert caught.value.error_code == "INVALID_PARAMETER_VALUE"
        assert "\n" not in caught.value.message
    # Through pyfunc too (after the signature's own checks pass).
    with pytest.raises(MlflowException, match="expected raw pixels in 0-255"):
        model.predict(np.full((2, 28, 28), 1000, np.float32))


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
