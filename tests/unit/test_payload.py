"""The registered model's input forms in process (``core/payload.py``): pixels, ``uint8_base64`` and
``png_base64`` give the same pixels; bad base64, a wrong byte count, a broken or wrong-size PNG, mixed
fields and bad pixel values each get one line naming the field, the image and what was expected."""

from __future__ import annotations

import base64

import numpy as np
import pandas as pd
import pytest

from mnist_cnn.core.images import load_digit
from mnist_cnn.core.payload import MAX_IMAGES, BadInput, check_pixels, pixels_of, png_base64, uint8_base64


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(5, 28, 28)).astype(np.uint8)


def test_each_form_gives_the_same_pixels(images):
    expected = images.astype(np.float32)
    forms = {
        "array": images,
        "float lists": images.astype(float).tolist(),
        "numeric strings": images.astype(str),  # what JSON strings of numbers arrive as
        "pixels column": pd.DataFrame({"pixels": [image.ravel().tolist() for image in images]}),
        "uint8 string": {"uint8_base64": np.array(uint8_base64(images))},  # {"inputs": {...}} as MLflow parses it
        "uint8 strings, one per image": pd.DataFrame({"uint8_base64": [uint8_base64(image) for image in images]}),
        "png column": pd.DataFrame({"png_base64": [png_base64(image) for image in images]}),
        "png list": {"png_base64": np.array([png_base64(image) for image in images])},
    }
    for name, given in forms.items():
        pixels = pixels_of(given)
        assert pixels.dtype == np.float32 and np.array_equal(pixels, expected), name


def test_preprocess_makes_a_photo_mnist_like_as_predict_does(digits, tmp_path):
    root, _ = digits
    paths = sorted((root / "big-inverted-rgb").iterdir())[:3]
    sent = {"png_base64": np.array([base64.b64encode(path.read_bytes()).decode() for path in paths])}
    assert np.array_equal(pixels_of(sent, preprocess=True), np.stack([load_digit(path) for path in paths]))
    with pytest.raises(BadInput, match=r'png_base64\[0\]: \d+x\d+ pixels, expected 28x28 .*"preprocess": true'):
        pixels_of(sent)


def bad_png() -> str:
    noise = np.random.default_rng(1).integers(0, 256, size=(28, 28))
    good = base64.b64decode(png_base64(noise))
    return base64.b64encode(good[: len(good) - 100]).decode()  # the header whole, the pixels cut off


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"uint8_base64": "not base64!"}, r"uint8_base64\[0\]: not valid base64"),
        ({"uint8_base64": base64.b64encode(bytes(785)).decode()}, r"uint8_base64\[0\]: 785 bytes, expected a whole"),
        ({"uint8_base64": ""}, r"uint8_base64\[0\]: 0 bytes"),
        ({"uint8_base64": np.array([], dtype=str)}, "uint8_base64: empty input: no images"),
        ({"uint8_base64": np.array([7])}, r"uint8_base64\[0\]: a int, expected a base64 string"),
        ({"png_base64": ["", "x"]}, r"png_base64\[0\]: not an image Pillow can read"),
        ({"png_base64": [bad_png()]}, r"png_base64\[0\]: truncated or corrupt image"),
        ({"png_base64": ["a", "b"], "pixels": [1, 2]}, r"fields \['pixels', 'png_base64'\]: expected exactly one"),
        ({"images": ["a"]}, r"fields \['images'\]: expected exactly one of pixels, uint8_base64, png_base64"),
        (pd.DataFrame({"pixels": [[0] * 729]}), r"pixels: rows of \[729\] numbers, expected 784 per image"),
        (np.zeros((1, 27, 27)), r"pixels: shape \(1, 27, 27\), expected \(N, 28, 28\)"),
        (np.zeros((0, 28, 28)), "pixels: empty input: no images"),
        (np.array([[["seven"] * 28] * 28]), "pixels: could not convert string to float: 'seven'"),
        (np.zeros((1, 28, 28), bool), r"pixels: dtype bool \(booleans\), expected numbers"),
        (np.full((1, 28, 28), np.nan), "pixels: image 0 holds NaN or infinity"),
        (np.full((2, 28, 28), 300.0), "pixels: image 0 has values from 300 to 300, expected raw pixels in 0-255"),
        (np.full((1, 28, 28), 0.5), "pixels: image 0 has values from 0.5 to 0.5, pixels scaled to 0-1"),
        ({"uint8_base64": uint8_base64(np.zeros((MAX_IMAGES + 1, 28, 28)))}, "20,001 images in one call"),
    ],
)
def test_bad_input_gets_one_line_naming_it(given, message):
    with pytest.raises(BadInput, match=message) as caught:
        pixels_of(given)
    assert "\n" not in str(caught.value)


def test_what_stays_accepted():
    """An all-black image (raw pixels, not 0-1 ones), a channel axis of 1, and MAX_IMAGES at once."""
    assert pixels_of(np.zeros((1, 28, 28))).max() == 0
    assert pixels_of(np.zeros((3, 1, 28, 28), np.uint8)).shape == (3, 28, 28)
    assert check_pixels(np.zeros((MAX_IMAGES, 28, 28), np.float32)).shape == (MAX_IMAGES, 28, 28)
