"""The champion behind the real ``mlflow models serve`` (a subprocess on a loopback port): digits and
probabilities for MLflow's JSON input formats and the compact forms (base64 bytes, PNGs), 4xx answers
for bad input (0-1 pixels, booleans, broken base64 and PNGs among them), and nothing left running."""

from __future__ import annotations

import base64
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import psutil
import pytest
import requests

from mnist_cnn.core.images import load_digit
from mnist_cnn.core.payload import png_base64, uint8_base64
from mnist_cnn.ops.scoring import scoring_server
from mnist_cnn.tracking.pyfunc import OUTPUT_COLUMNS, PROBABILITY_COLUMNS

CHAMPION = "models:/mnist-cnn@champion"

# One worker (pytest-xdist) for the whole module: its tests share a module-scoped fixture.
pytestmark = pytest.mark.xdist_group("scoring-server")


@pytest.fixture(scope="module")
def server(champion, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-log") / "scoring-server.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": champion.uri, "MLFLOW_REGISTRY_URI": champion.uri}
    # Two uvicorn workers, as docs/serving.md advises for two cores.
    with scoring_server(CHAMPION, env=env, log=log, workers=2) as url:
        yield url
    port = url.rsplit(":", 1)[1]
    left = [p.info for p in psutil.process_iter(["pid", "cmdline"]) if port in " ".join(p.info["cmdline"] or [])]
    assert not left, f"still running after stop: {left}"


def post(url: str, body) -> requests.Response:
    data = body if isinstance(body, str) else json.dumps(body)
    return requests.post(f"{url}/invocations", data=data, headers={"Content-Type": "application/json"}, timeout=120)


def bodies(pixels: np.ndarray) -> dict[str, dict]:
    """The same images in each JSON format MLflow's scoring server documents, and in the compact forms."""
    return {
        "inputs": {"inputs": pixels.tolist()},
        "instances": {"instances": pixels.tolist()},
        # One column holding each image's 784 pixels, row by row.
        "dataframe_split": {
            "dataframe_split": {"columns": ["pixels"], "data": [[image.ravel().tolist()] for image in pixels]}
        },
        "uint8_base64": {"inputs": {"uint8_base64": uint8_base64(pixels)}},
        "uint8_base64 column": {"dataframe_split": {"columns": ["uint8_base64"], "data": [[uint8_base64(pixels)]]}},
        "png_base64": {"dataframe_split": {"columns": ["png_base64"], "data": [[png_base64(i)] for i in pixels]}},
        "png_base64 inputs": {"inputs": {"png_base64": [png_base64(image) for image in pixels]}},
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
    # As one base64 string (10 MB): the same 10,000 as nested JSON lists (28 MB) cost 18 s more here.
    response = post(server, {"inputs": {"uint8_base64": uint8_base64(many)}})
    assert response.status_code == 200, response.text[:300]
    digits = np.array([row["digit"] for row in response.json()["predictions"]])
    assert np.array_equal(digits, np.tile(expected["digit"].to_numpy(), reps)[:10_000])


def test_64_concurrent_single_image_requests_each_get_their_own_answer(champion, server):
    """64 clients at once, one image each, across the two workers: every answer is its own image's digit
    and probabilities (no answer mixed up with another request's, none empty)."""
    pixels, expected = champion.pixels[:64], champion.expected.iloc[:64]
    assert len(pixels) == 64
    bodies = [{"inputs": {"uint8_base64": uint8_base64(image[None])}} for image in pixels]
    barrier = threading.Barrier(len(bodies))

    def ask(body: dict) -> requests.Response:
        barrier.wait(timeout=60)  # all 64 sent together
        return post(server, body)

    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        responses = list(pool.map(ask, bodies))
    assert [r.status_code for r in responses] == [200] * len(bodies)
    rows = [r.json()["predictions"] for r in responses]
    assert [len(answer) for answer in rows] == [1] * len(bodies)
    assert [answer[0]["digit"] for answer in rows] == expected["digit"].tolist()
    probabilities = np.array([[answer[0][c] for c in PROBABILITY_COLUMNS] for answer in rows])
    assert np.allclose(probabilities, expected[PROBABILITY_COLUMNS].to_numpy(), atol=1e-6)


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
            "Error: pixels: shape (1, 27, 27), expected (N, 28, 28) (raw grayscale images)",
        ),
        "27x27 dataframe": (
            {"dataframe_split": {"columns": ["pixels"], "data": [[[0] * 729]]}},
            "INVALID_PARAMETER_VALUE",
            "Error: pixels: rows of [729] numbers, expected 784 per image (28x28, row by row)",
        ),
        "bad base64": (
            {"inputs": {"uint8_base64": "not base64!"}},
            "INVALID_PARAMETER_VALUE",
            "Error: uint8_base64[0]: not valid base64",
        ),
        "wrong byte count": (
            {"inputs": {"uint8_base64": base64.b64encode(bytes(800)).decode()}},
            "INVALID_PARAMETER_VALUE",
            "Error: uint8_base64[0]: 800 bytes, expected a whole number of 28x28 images (784 bytes each",
        ),
        "broken PNG": (
            {"inputs": {"png_base64": [png_base64(pixels[0]), base64.b64encode(b"not a png").decode()]}},
            "INVALID_PARAMETER_VALUE",
            "Error: png_base64[1]: not an image Pillow can read (expected PNG or JPEG)",
        ),
        "PNG not 28x28": (
            {"inputs": {"png_base64": [png_base64(np.zeros((40, 30)))]}},
            "INVALID_PARAMETER_VALUE",
            "Error: png_base64[0]: 30x40 pixels, expected 28x28 MNIST-style pixels",
        ),
        "preprocess not a boolean": (
            {"inputs": {"png_base64": [png_base64(pixels[0])]}, "params": {"preprocess": "yes"}},
            "INVALID_PARAMETER_VALUE",
            "Failed to validate type and shape for 'preprocess'",
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
        # torchvision's habit: answered 200 with every digit an 8 before the model checked for it.
        "0-1": (
            {"inputs": (pixels[:2] / 255.0).tolist()},
            "INVALID_PARAMETER_VALUE",
            "pixels scaled to 0-1; the model takes raw pixels in 0-255 (multiply by 255)",
        ),
        "booleans": (
            {"instances": (pixels[:1] > 127).tolist()},
            "INVALID_PARAMETER_VALUE",
            "Error: pixels: dtype bool (booleans), expected numbers: raw pixels in 0-255",
        ),
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
    black = post(server, {"inputs": np.zeros((1, 28, 28), int).tolist()})  # all black: raw pixels, not 0-1 ones
    assert black.status_code == 200, black.text[:300]


def test_strings_and_an_empty_list_reach_the_model_and_get_its_answer(champion, server):
    """With no input schema MLflow passes JSON on as it parsed it: numeric strings answer like the numbers,
    other strings and an empty list get the model's one line (docs/serving.md)."""
    pixels = champion.pixels[:2]
    as_strings = post(server, {"inputs": pixels.astype(str).tolist()})
    assert as_strings.status_code == 200, as_strings.text[:300]
    digits = [row["digit"] for row in as_strings.json()["predictions"]]
    assert digits == champion.expected["digit"].tolist()[:2]
    words = post(server, {"inputs": [[["seven"] * 28] * 28]})
    assert words.status_code == 400
    assert last_line(words) == "Error: pixels: could not convert string to float: 'seven'; expected raw pixels in 0-255"
    empty = post(server, {"instances": []})
    assert empty.status_code == 400
    assert "pixels: empty input: no images" in last_line(empty), last_line(empty)


def test_a_photo_of_a_digit_is_posted_as_it_is_with_preprocess(champion, server, digits):
    """A PNG of any size and polarity, with "params": {"preprocess": true}: the digit ``predict`` gives the
    same file (the same MNIST-style preprocessing)."""
    root, _ = digits
    paths = sorted((root / "big-inverted-rgb").iterdir())[:8]
    photos = [base64.b64encode(path.read_bytes()).decode("ascii") for path in paths]
    response = post(server, {"inputs": {"png_base64": photos}, "params": {"preprocess": True}})
    assert response.status_code == 200, response.text[:300]
    expected = champion.model.predict(np.stack([load_digit(path) for path in paths]))
    assert [row["digit"] for row in response.json()["predictions"]] == expected["digit"].tolist()
    refused = post(server, {"inputs": {"png_base64": photos}})
    assert refused.status_code == 400 and '"preprocess": true' in last_line(refused)
