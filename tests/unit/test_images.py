"""``predict``'s image handling in process: MNIST-style preprocessing, blank, unreadable and animated
files, the digit table's checks, an empty store file."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage

from mnist_cnn.core.images import BOX, ImageError, image_files, load_digit, mnist_like
from mnist_cnn.stages.predict import _is_digit_table
from mnist_cnn.tracking.pyfunc import load_model


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


def _on_white(image: np.ndarray) -> np.ndarray:
    return (255 - image.astype(np.uint16)) * 257  # black ink on white paper, in 16 bits


def test_16_and_12_bit_greys_are_scaled_not_clipped(digits, tmp_path):
    """Pillow's own conversion of a 16-bit grey PNG to 8 bits clips at 255: a black-on-white digit becomes
    all white (blank), and a 12-bit scan (0..4095) a blotch. Read from their full scale, each gives the
    28x28 of the plain 8-bit digit."""
    root, images = digits
    digit = images[0]
    reference = load_digit(root / "raw" / "000.png")
    wide = {
        "16-bit.png": (255 - digit.astype(np.uint16)) * 257,  # black ink on white paper
        "12-bit.png": ((digit.astype(np.uint32) * 4095 + 127) // 255).astype(np.uint16),
        "12-bit-on-white.png": (((255 - digit.astype(np.uint32)) * 4095 + 127) // 255).astype(np.uint16),
        "8-bit-in-16.png": digit.astype(np.uint16),
    }
    for name, values in wide.items():
        Image.fromarray(values).save(tmp_path / name)
        with Image.open(tmp_path / name) as saved:
            assert saved.mode == "I;16", name
            clipped = np.asarray(saved.convert("L"), dtype=np.float32)
        assert np.abs(load_digit(tmp_path / name) - reference).max() < 2.0, name
        if name != "8-bit-in-16.png":  # the fault is real: Pillow's 8 bits are not the digit
            try:
                misread = np.abs(mnist_like(clipped) - reference).mean()
            except ImageError as exc:
                misread = str(exc)
            assert misread == "image: blank image (contrast 0 of 255 grey levels), no digit found" or misread > 20, (
                name,
                misread,
            )


def test_strokes_on_a_transparent_background_read_like_the_plain_digit(digits, tmp_path):
    """The ink is where the alpha is, whichever colour: white strokes on a transparent canvas (on white,
    as Pillow composites, they vanish), black ones, whatever colour the transparent pixels hold."""
    root, images = digits
    digit = images[0]
    reference = load_digit(root / "raw" / "000.png")
    for stroke in (255, 0, 128):
        for hidden in (0, 255):
            rgba = np.zeros((*digit.shape, 4), np.uint8)
            rgba[..., :3] = np.where(digit[..., None] > 0, stroke, hidden)
            rgba[..., 3] = digit
            path = tmp_path / f"stroke-{stroke}-under-{hidden}.png"
            Image.fromarray(rgba, "RGBA").save(path)
            assert np.abs(load_digit(path) - reference).max() < 2.0, path.name
    grey_alpha = np.stack([np.full_like(digit, 255), digit], axis=-1)  # LA: white strokes
    Image.fromarray(grey_alpha, "LA").save(tmp_path / "la.png")
    assert np.abs(load_digit(tmp_path / "la.png") - reference).max() < 2.0
    # Opaque ink on an opaque background is read as before: transparency plays no part.
    opaque = np.stack([255 - digit] * 3 + [np.full_like(digit, 255)], axis=-1)
    Image.fromarray(opaque, "RGBA").save(tmp_path / "opaque.png")
    assert np.abs(load_digit(tmp_path / "opaque.png") - reference).max() < 2.0


def test_a_symlink_loop_is_said_not_called_corrupt(tmp_path):
    os.symlink(tmp_path / "b.png", tmp_path / "a.png")
    os.symlink(tmp_path / "a.png", tmp_path / "b.png")
    with pytest.raises(ImageError) as caught:
        load_digit(tmp_path / "a.png")
    assert (
        str(caught.value) == f"{tmp_path / 'a.png'}: a symlink loop, cannot be read (Too many levels of symbolic links)"
    )


def test_a_directory_argument_keeps_its_dead_links_so_they_are_reported(tmp_path):
    (tmp_path / "digit.png").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "folder.png").mkdir()  # a directory with an image suffix is no image file
    os.symlink(tmp_path / "loop-b.png", tmp_path / "loop-a.png")
    os.symlink(tmp_path / "loop-a.png", tmp_path / "loop-b.png")
    os.symlink(tmp_path / "gone.png", tmp_path / "broken.png")
    names = [path.name for path in image_files([tmp_path])]
    assert names == ["broken.png", "digit.png", "loop-a.png", "loop-b.png"]
    with pytest.raises(ImageError, match="a symlink loop"):
        load_digit(tmp_path / "loop-a.png")
