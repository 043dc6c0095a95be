"""What a request to the registered model may hold -> float32 raw pixels (N, 28, 28), or one line naming
what is wrong with it.

Three forms, each a JSON field or a DataFrame column MLflow's scoring server passes on as it parsed it:

- ``pixels`` as numbers: an (N, 28, 28) array (``{"inputs": [...]}``, ``{"instances": [...]}``) or a
  ``pixels`` column holding each image's 784 numbers;
- ``uint8_base64``: one base64 string of N*784 bytes, the images' raw pixels row by row (several strings
  are read one after another): about 1 KB of JSON per image instead of 2.8 KB;
- ``png_base64``: one base64 PNG (or JPEG) per image; 28x28 MNIST-style pixels as they are, or any
  photo of a digit when the request asks for ``preprocess`` (made MNIST-style as ``predict`` does).
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

import numpy as np
from PIL import Image

from mnist_cnn.core.errors import ProjectError
from mnist_cnn.core.images import ImageError, decode_image, mnist_like
from mnist_cnn.core.model import IMAGE_SIZE

PIXELS = "pixels"
UINT8_BASE64 = "uint8_base64"
PNG_BASE64 = "png_base64"
FIELDS = (PIXELS, UINT8_BASE64, PNG_BASE64)


IMAGE_BYTES = IMAGE_SIZE * IMAGE_SIZE


# Images one call takes: 20,000 run in seconds on two cores and hold 63 MB of pixels. Bigger batches are
# refused at once rather than run for minutes after the scoring server has given up on them (504 at
# MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT, 60 s, while its worker thread goes on).
MAX_IMAGES = 20_000


# numpy's kinds of numbers a pixel may be: signed and unsigned integers, floats (not bool, complex,
# strings or Python objects).
NUMERIC_KINDS = "iuf"


NON_NUMBERS = {"b": "booleans", "S": "bytes", "O": "Python objects", "c": "complex numbers"}


class BadInput(ProjectError, ValueError):
    """A request the model cannot answer: the message names the field, the image and what was expected."""


def pixels_of(model_input: Any, preprocess: bool = False) -> np.ndarray:
    """``model_input`` in any of the three forms -> float32 (N, 28, 28) raw pixels in 0-255."""
    fields = _fields(model_input)
    if fields is None:
        return check_pixels(model_input)
    present = [name for name in fields if name in FIELDS]
    if len(present) != 1 or len(fields) != 1:
        raise BadInput(f"fields {sorted(fields)}: expected exactly one of {', '.join(FIELDS)}")
    values = fields[present[0]]
    if present[0] == PIXELS:
        return check_pixels(_stacked_rows(values))
    strings = _strings(present[0], values)
    if present[0] == UINT8_BASE64:
        return check_pixels(_from_uint8(strings))
    return check_pixels(_from_pngs(strings, preprocess))


def _fields(model_input: Any) -> dict[str, Any] | None:
    """The named fields of a DataFrame or a dict (``{"inputs": {"png_base64": [...]}}``), or None for a
    plain array of pixels."""
    if hasattr(model_input, "columns") and hasattr(model_input, "to_dict"):  # a pandas DataFrame
        return {str(name): model_input[name].to_list() for name in model_input.columns}
    if isinstance(model_input, dict):
        return {str(name): value for name, value in model_input.items()}
    return None


def _stacked_rows(rows: list) -> np.ndarray:
    try:
        stacked = np.asarray([np.asarray(row, dtype=np.float32).reshape(-1) for row in rows])
    except (TypeError, ValueError) as exc:
        raise BadInput(f"{PIXELS}: expected each row to hold an image's {IMAGE_BYTES} numbers ({exc})") from None
    if stacked.ndim != 2 or stacked.shape[1] != IMAGE_BYTES:
        sizes = sorted({np.size(row) for row in rows})
        raise BadInput(f"{PIXELS}: rows of {sizes} numbers, expected {IMAGE_BYTES} per image (28x28, row by row)")
    return stacked.reshape(-1, IMAGE_SIZE, IMAGE_SIZE)


def _strings(field: str, values: Any) -> list[str]:
    strings = np.asarray(values, dtype=object).reshape(-1).tolist()
    if not strings:
        raise BadInput(f"{field}: empty input: no images")
    for index, value in enumerate(strings):
        if not isinstance(value, str):
            raise BadInput(f"{field}[{index}]: a {type(value).__name__}, expected a base64 string")
    return strings


def _decoded(field: str, index: int, text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadInput(f"{field}[{index}]: not valid base64 ({exc})") from None


def _from_uint8(strings: list[str]) -> np.ndarray:
    chunks = []
    for index, text in enumerate(strings):
        raw = _decoded(UINT8_BASE64, index, text)
        if len(raw) == 0 or len(raw) % IMAGE_BYTES:
            raise BadInput(
                f"{UINT8_BASE64}[{index}]: {len(raw):,} bytes, expected a whole number of 28x28 images "
                f"({IMAGE_BYTES} bytes each, one byte per pixel)"
            )
        chunks.append(np.frombuffer(raw, dtype=np.uint8))
    flat = np.concatenate(chunks)
    _check_count(len(flat) // IMAGE_BYTES)
    return flat.reshape(-1, IMAGE_SIZE, IMAGE_SIZE).astype(np.float32)


def _from_pngs(strings: list[str], preprocess: bool) -> np.ndarray:
    _check_count(len(strings))
    images = []
    for index, text in enumerate(strings):
        name = f"{PNG_BASE64}[{index}]"
        try:
            grey = decode_image(io.BytesIO(_decoded(PNG_BASE64, index, text)), name)
            images.append(mnist_like(grey, name) if preprocess else _as_is(grey, name))
        except ImageError as exc:
            raise BadInput(str(exc)) from None
    return np.stack(images)


def _as_is(grey: np.ndarray, name: str) -> np.ndarray:
    if grey.shape != (IMAGE_SIZE, IMAGE_SIZE):
        height, width = grey.shape
        raise BadInput(
            f"{name}: {width}x{height} pixels, expected 28x28 MNIST-style pixels (white digit on black); "
            'add "params": {"preprocess": true} to have any photo of a digit made MNIST-style'
        )
    return grey


def _check_count(count: int) -> None:
    if count > MAX_IMAGES:
        raise BadInput(
            f"pixels: {count:,} images in one call, more than the {MAX_IMAGES:,} the model takes; "
            f"send them in batches of at most {MAX_IMAGES:,}"
        )


def check_pixels(model_input: Any) -> np.ndarray:
    """``model_input`` as float32 (N, 28, 28), or a ``BadInput`` naming what is wrong with it."""
    try:
        given = np.asarray(model_input)
    except (TypeError, ValueError):
        given = None
    if given is None or given.dtype.kind == "O" and given.ndim > 1:  # ragged nested lists
        raise BadInput(
            f"pixels: expected numbers in an array of shape (N, {IMAGE_SIZE}, {IMAGE_SIZE}), "
            f"got {type(model_input).__name__}"
        )
    if given.ndim >= 1 and len(given) == 0:
        raise BadInput(f"pixels: empty input: no images (expected an array of shape (N, {IMAGE_SIZE}, {IMAGE_SIZE}))")
    pixels = _numbers(given)
    if pixels.ndim == 4 and pixels.shape[1] == 1:
        pixels = pixels[:, 0]
    if pixels.ndim != 3 or pixels.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise BadInput(
            f"pixels: shape {tuple(pixels.shape)}, expected (N, {IMAGE_SIZE}, {IMAGE_SIZE}) (raw grayscale images)"
        )
    _check_count(len(pixels))
    _check_range(pixels)
    return pixels


def _numbers(given: np.ndarray) -> np.ndarray:
    if given.dtype.kind == "U":  # JSON strings: numeric ones ("12") are read as the numbers
        try:
            return given.astype(np.float32)
        except ValueError:
            word = next(value for value in given.reshape(-1).tolist() if not _is_number(value))
            message = f"could not convert string to float: {word!r}; expected raw pixels in 0-255"
            raise BadInput(f"pixels: {message}") from None
    if given.dtype.kind not in NUMERIC_KINDS:
        what = NON_NUMBERS.get(given.dtype.kind, "not numbers")
        raise BadInput(f"pixels: dtype {given.dtype} ({what}), expected numbers: raw pixels in 0-255")
    return given.astype(np.float32, copy=False)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _check_range(pixels: np.ndarray) -> None:
    finite = np.isfinite(pixels)
    if not finite.all():
        image = int(np.argwhere(~finite)[0][0])
        raise BadInput(f"pixels: image {image} holds NaN or infinity, expected numbers in 0-255")
    low, high = pixels.min(axis=(1, 2)), pixels.max(axis=(1, 2))
    bad = np.flatnonzero((low < 0) | (high > 255))
    if len(bad):
        image = int(bad[0])
        raise BadInput(
            f"pixels: image {image} has values from {low[image]:g} to {high[image]:g}, expected raw pixels in 0-255"
        )
    # An image whose brightest pixel is at most 1 (an all-black one aside) is 0-1 scaled pixels, the
    # torchvision habit: as raw pixels it is black, and the model would answer it with confident garbage.
    scaled = np.flatnonzero((high > 0) & (high <= 1))
    if len(scaled):
        image = int(scaled[0])
        raise BadInput(
            f"pixels: image {image} has values from {low[image]:g} to {high[image]:g}, pixels scaled to 0-1; "
            "the model takes raw pixels in 0-255 (multiply by 255)"
        )


def uint8_base64(images: np.ndarray) -> str:
    """The client's side of ``uint8_base64``: (N, 28, 28) pixels in 0-255 -> one base64 string."""
    return base64.b64encode(np.ascontiguousarray(images, dtype=np.uint8).tobytes()).decode("ascii")


def png_base64(image: np.ndarray) -> str:
    """The client's side of ``png_base64``: one image's grey levels in 0-255 -> a base64 PNG."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
