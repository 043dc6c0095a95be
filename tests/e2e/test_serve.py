"""The champion behind the real ``mlflow models serve`` (a subprocess on a loopback port): digits and
probabilities for MLflow's three JSON input formats, 4xx answers for bad input (0-1 pixels, booleans, an
over-size batch among them), and nothing left running."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import psutil
import pytest
import requests

from mnist_cnn.ops.scoring import scoring_server
from mnist_cnn.tracking.pyfunc import OUTPUT_COLUMNS, PROBABILITY_COLUMNS

CHAMPION = "models:/mnist-cnn@champion"

# One worker (pytest-xdist) for the whole module: its tests share a module-scoped fixture.
pytestmark = pytest.mark.xdist_group("scoring-server")


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
        # torchvision's habit: answered 200 with every digit an 8 before the model checked for it.
        "0-1": (
            {"inputs": (pixels[:2] / 255.0).tolist()},
            "INVALID_PARAMETER_VALUE",
            "pixels scaled to 0-1 or booleans; the model takes raw pixels in 0-255 (multiply by 255)",
        ),
        # JSON's true and false reach the model as 1.0 and 0.0 (MLflow's parser casts to the signature's float32).
        "booleans": (
            {"instances": (pixels[:1] > 127).tolist()},
            "INVALID_PARAMETER_VALUE",
            "Error: pixels: image 0 has values from 0 to 1, pixels scaled to 0-1 or booleans",
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


def test_what_mlflow_parses_before_the_model_sees_it(champion, server):
    """Two inputs the model never sees as sent, pinned here as docs/serving.md describes them: numeric
    strings, which MLflow's parser casts to the signature's float32 (so they answer like the numbers),
    and an empty list, which MLflow's schema check refuses in its own words before the model can say
    "empty"."""
    pixels = champion.pixels[:2]
    as_strings = post(server, {"inputs": pixels.astype(str).tolist()})
    assert as_strings.status_code == 200, as_strings.text[:300]
    digits = [row["digit"] for row in as_strings.json()["predictions"]]
    assert digits == champion.expected["digit"].tolist()[:2]
    words = post(server, {"inputs": [[["seven"] * 28] * 28]})
    assert words.status_code == 400 and "could not convert string to float: 'seven'" in words.json()["message"]
    empty = post(server, {"instances": []})
    assert empty.status_code == 400
    assert "an input of type <class 'list'> was found" in last_line(empty), last_line(empty)
