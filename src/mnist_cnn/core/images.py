"""Image files of a handwritten digit (PNG, JPEG, any size and colours) -> 28x28 raw pixels, as MNIST
itself was made: white ink on black, cropped to the ink, scaled into a 20x20 box keeping the aspect
ratio (anti-aliased), centred by centre of mass in 28x28."""

from __future__ import annotations

import errno
import os
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from scipy import ndimage

from mnist_cnn.core.errors import ProjectError
from mnist_cnn.core.model import IMAGE_SIZE

BOX = 20  # MNIST's digits fit a 20x20 box inside the 28x28 field


# Decompression-bomb guard: a 48-megapixel phone photo passes, a 20000x20000 PNG of a few hundred KB does
# not. Pillow warns above this and raises above twice it; the warning is made an error below.
MAX_PIXELS = 64_000_000


# Ink is what stands out from the background by more than this share of the image's contrast: it
# keeps paper grain and JPEG noise out of the crop.
INK_THRESHOLD = 0.2


# A contrast below this many grey levels (of 255) is a blank image, not a faint digit.
MIN_CONTRAST = 24


# The ink's longer side, in pixels, below which it is a speck of dust, not a digit (MNIST's digits span
# 20; a hand-drawn 8x8 scikit-learn digit still spans 5 or more).
MIN_DIGIT_SPAN = 3


SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class ImageError(ProjectError, ValueError):
    """An image file that cannot be read, or holds no digit."""


def read_grayscale(path: Path) -> np.ndarray:
    """The image at ``path`` as float32 grey levels 0-255 (16-bit and 12-bit greys scaled, transparency
    composited: see ``grey_levels``)."""
    path = Path(path)
    if path.is_dir():
        raise ImageError(f"{path}: a directory without image files ({' '.join(SUFFIXES)})")
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except OSError as exc:  # a symlink loop, no permission: the file system's answer, not the image's
        raise ImageError(f"{path}: {_unopenable(exc)}") from None
    with handle:
        if os.fstat(handle.fileno()).st_size == 0:
            raise ImageError(f"{path}: empty file, expected a PNG or JPEG image")
        return decode_image(handle, str(path))


def _unopenable(exc: OSError) -> str:
    reason = exc.strerror or type(exc).__name__
    if exc.errno == errno.ELOOP:
        return f"a symlink loop, cannot be read ({reason})"
    return f"cannot be read ({reason})"


def decode_image(handle: BinaryIO, name: str) -> np.ndarray:
    """The image in ``handle`` (a file, or bytes a request sent) as float32 grey levels 0-255; errors
    name it ``name``."""
    try:
        Image.MAX_IMAGE_PIXELS = MAX_PIXELS
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # Pillow warns of damaged metadata ("Corrupt EXIF data") on its way to the error below, or
            # to a picture read without it: either way the warning says nothing the user can act on.
            warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
            with Image.open(handle) as image:
                if _is_animation(image, name):  # which frame holds the digit is anyone's guess
                    raise ImageError(f"{name}: {image.n_frames} frames (an animation), expected one image")
                image.load()
                return grey_levels(ImageOps.exif_transpose(image))
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image Pillow can read (expected PNG or JPEG)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(
            f"{name}: {_size(handle)} pixels, more than the {MAX_PIXELS:,} allowed (decompression-bomb guard)"
        ) from None
    except (OSError, SyntaxError, EOFError, ValueError) as exc:
        # Pillow reports a cut-off or damaged file from its decoders as any of these.
        raise ImageError(f"{name}: truncated or corrupt image ({exc})") from None


# Pillow's modes of more than 8 bits per grey level: 16-bit PNG and TIFF greys (I;16*), 32-bit integer
# and float TIFFs. Pillow's own conversion to 8 bits clips them at 255 instead of scaling.
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


# The bit depths a grey image stored in 16 bits may really have: 8 (an 8-bit image saved as 16-bit),
# 12 (a scanner's or camera's 12-bit values, 0..4095) and 16.
GREY_DEPTHS = (8, 12, 16)


def grey_levels(image: Image.Image) -> np.ndarray:
    """``image`` as float32 grey levels 0-255: wide greys scaled from their full scale (``full_scale``),
    transparency composited (``composite``)."""
    alpha = None
    if image.mode in WIDE_MODES:
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        grey = np.clip(values * (255.0 / full_scale(values, image.mode)), 0, 255).astype(np.float32)
        if "transparency" in image.info:  # a 16-bit PNG's tRNS: the one grey value that is transparent
            alpha = (values != image.info["transparency"]).astype(np.float32)
    elif image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        alpha = np.asarray(rgba.getchannel("A"), dtype=np.float32) / 255.0
        grey = np.asarray(rgba.convert("L"), dtype=np.float32)  # the colours alone, alpha dropped
    else:
        grey = np.asarray(image.convert("L"), dtype=np.float32)
    return grey if alpha is None or alpha.min() == 1.0 else composite(grey, alpha)


def full_scale(values: np.ndarray, mode: str) -> float:
    """The value that is white in a wide grey image: 1.0 for a float image in 0..1; else the top of the
    smallest of 8, 12 and 16 bits that holds its largest value (65535 for a 16-bit PNG, 4095 for a 12-bit
    scan stored in 16 bits, 255 for an 8-bit one); above 16 bits, its largest value."""
    top = float(values.max())
    if mode == "F" and top <= 1.0:
        return 1.0
    for bits in GREY_DEPTHS:
        if top <= 2**bits - 1:
            return float(2**bits - 1)
    return top


def composite(grey: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Grey levels with opacity ``alpha`` (0-1) on white, or on black where that shows more ink: dark
    strokes on a transparent background stand out on white, light ones (white strokes on a transparent
    canvas) on black. Whichever colour they are, the ink is where the alpha is."""
    on_white = grey * alpha + 255.0 * (1.0 - alpha)
    on_black = grey * alpha
    return on_black if _ink(on_black).max() > _ink(on_white).max() else on_white


def _is_animation(image: Image.Image, name: str) -> bool:
    """An animated GIF, PNG or WebP. A phone's JPEG with a gain map or preview (MPO) and a TIFF with a
    thumbnail page have more frames too, but their first one is the picture."""
    if image.format not in ("GIF", "PNG", "WEBP"):
        return False
    try:
        return bool(getattr(image, "is_animated", False))  # counting frames walks the whole file
    except Exception as exc:  # noqa: BLE001 - Pillow's frame walkers raise many kinds on a damaged file
        raise ImageError(f"{name}: truncated or corrupt image ({type(exc).__name__})") from None


def _size(handle: BinaryIO) -> str:
    # Reading the header alone is safe: Pillow decodes nothing before load().
    saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        handle.seek(0)
        with Image.open(handle) as image:
            return f"{image.width}x{image.height}"
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _ink(gray: np.ndarray) -> np.ndarray:
    """How far each pixel stands out from the background (the border's median grey), either polarity:
    dark ink on light paper (the usual scan or photo) becomes MNIST's light ink on black."""
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    background = float(np.median(border))
    return np.clip(background - gray if background > 127.5 else gray - background, 0, None)


def mnist_like(gray: np.ndarray, name: str = "image") -> np.ndarray:
    """Grey levels (H, W) in 0-255, either polarity -> float32 (28, 28) white-on-black, MNIST-style."""
    ink = _ink(np.asarray(gray, dtype=np.float32))
    contrast = float(ink.max())
    if contrast < MIN_CONTRAST:
        raise ImageError(f"{name}: blank image (contrast {contrast:.0f} of 255 grey levels), no digit found")
    ink = (ink * (255.0 / contrast)).astype(np.float32)
    rows, cols = np.nonzero(ink > INK_THRESHOLD * 255.0)
    ink = ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    if max(ink.shape) < MIN_DIGIT_SPAN:
        raise ImageError(f"{name}: the ink spans only {ink.shape[1]}x{ink.shape[0]} pixels, no digit found")
    # Every crop is first resampled to one working size (longer side 80 px: box averaging when shrinking a
    # photo, pixel replication when enlarging a small image), so that the same digit drawn at another size
    # gives the same 28x28.
    height, width = ink.shape
    work = BOX * 4
    size = (max(1, round(width * work / max(height, width))), max(1, round(height * work / max(height, width))))
    ink = np.asarray(Image.fromarray(ink).resize(size, Image.Resampling.BOX))
    scale = BOX / work  # output pixels per working pixel: the crop's longer side becomes 20
    cy, cx = ndimage.center_of_mass(ink)
    # One resampling does the scaling into the 20x20 box and puts the centre of mass at the centre of
    # the 28x28 field, to a fraction of a pixel: the source box that maps onto the field.
    half = IMAGE_SIZE / 2 / scale
    pad = int(np.ceil(2 * half)) + 2
    padded = np.pad(ink, pad)
    box = (cx + 0.5 + pad - half, cy + 0.5 + pad - half, cx + 0.5 + pad + half, cy + 0.5 + pad + half)
    field = Image.fromarray(padded).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS, box=box)
    return np.clip(np.asarray(field, dtype=np.float32), 0, 255)


def load_digit(path: Path) -> np.ndarray:
    """An image file -> float32 (28, 28) raw pixels in 0-255, ready for the registered model."""
    return mnist_like(read_grayscale(path), str(path))


def image_files(paths: list[Path]) -> list[Path]:
    """Files as given; a directory stands for the image files directly in it (by suffix, sorted).
    A link among them that leads nowhere (broken, or a loop) is kept, so that it is reported."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in SUFFIXES and _file_or_dead_link(p))
            files += found or [path]  # an empty directory is reported as such, not skipped in silence
        else:
            files.append(path)
    return files


def _file_or_dead_link(path: Path) -> bool:
    return path.is_file() or (path.is_symlink() and not path.exists())
