"""Random distortion of a whole batch on its own device: shift, rotation, scale, shear, elastic warp and
random erasing.

One ``affine_grid``/``grid_sample`` call per batch (the elastic field is added to the affine grid), so
it runs where training runs (GPU or CPU) and costs a small fraction of a step;
per-sample PIL transforms would starve a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Distortions:
    """Uniform ranges: shifts up to ``shift`` pixels, rotations up to ``rotate`` degrees, scale 1 ± ``scale``,
    a horizontal shear up to ``shear`` degrees (a vertical stroke leans by that angle; rows keep their ink);
    an elastic warp (Simard et al., 2003): a uniform [-1, 1] displacement field per image, smoothed by a
    Gaussian of ``elastic_sigma`` pixels and multiplied by ``elastic_alpha`` pixels (0: off); and random
    erasing (Zhong et al., 2017): with probability ``erase``, a rectangle of the image is blanked."""

    shift: float = 0.0
    rotate: float = 0.0
    scale: float = 0.0
    elastic_alpha: float = 0.0
    elastic_sigma: float = 4.0
    shear: float = 0.0
    erase: float = 0.0

    @property
    def active(self) -> bool:
        moves = (self.shift, self.rotate, self.scale, self.shear, self.elastic_alpha, self.erase)
        return any(value > 0 for value in moves)


def _uniform(n: int, half_width: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return (torch.rand(n, generator=generator, device=device) * 2 - 1) * half_width


def _smooth(field: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of (N, C, H, W), as two 1-D passes: a 25×25 kernel in one 2-D pass (torchvision's
    ``gaussian_blur``) took 3.8 ms per batch of 64 on a CPU, these two take 0.8 ms (a step is about 17 ms)."""
    n, c, height, width = field.shape
    # Three sigmas each side, but reflect padding must stay inside the image.
    radius = min(math.ceil(3 * sigma), min(height, width) - 1)
    offsets = torch.arange(-radius, radius + 1, device=field.device, dtype=field.dtype)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    flat = field.reshape(n * c, 1, height, width)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    return flat.view(n, c, height, width)


def _elastic_field(n: int, height: int, width: int, d: Distortions, generator: torch.Generator, device) -> torch.Tensor:
    """(N, H, W, 2) displacements in ``affine_grid``'s [-1, 1] units, smooth over ``elastic_sigma`` pixels."""
    noise = torch.rand(n, 2, height, width, generator=generator, device=device) * 2 - 1
    field = _smooth(noise, d.elastic_sigma) * d.elastic_alpha
    field = field * torch.tensor([2 / width, 2 / height], device=device).view(1, 2, 1, 1)  # pixels -> grid units
    return field.permute(0, 2, 3, 1)


def random_distort(x: torch.Tensor, d: Distortions, generator: torch.Generator, background: float) -> torch.Tensor:
    """``x`` (N, C, H, W) moved by one random affine map (and elastic warp) per image; uncovered pixels take
    ``background`` (the normalised value of a blank pixel, not 0, which normalised data would read as ink)."""
    n, _, height, width = x.shape
    device = x.device
    angle = _uniform(n, math.radians(d.rotate), generator, device)
    scale = 1 + _uniform(n, d.scale, generator, device)
    # affine_grid maps output to input coordinates in [-1, 1]: one pixel is 2 / size.
    shift_x = _uniform(n, d.shift * 2 / width, generator, device)
    shift_y = _uniform(n, d.shift * 2 / height, generator, device)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    # Drawn only when asked for: without shear the random stream (and every earlier result) is unchanged.
    lean = torch.tan(_uniform(n, math.radians(d.shear), generator, device)) if d.shear > 0 else 0.0
    # Rotation-and-scale times the shear [[1, lean], [0, 1]]: x_in = x + lean * y before rotating.
    theta = torch.stack(
        [torch.stack([cos, cos * lean - sin, shift_x], 1), torch.stack([sin, sin * lean + cos, shift_y], 1)], 1
    )
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    if d.elastic_alpha > 0:
        grid = grid + _elastic_field(n, height, width, d, generator, device).to(x.dtype)
    moved = F.grid_sample(x - background, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if d.erase > 0:
        moved = moved * ~_erased(n, height, width, d.erase, generator, device).unsqueeze(1)
    return moved + background


# torchvision's RandomErasing defaults: the box covers 2-33% of the image, its aspect ratio 0.3-3.3.
ERASE_AREA = (0.02, 0.33)
ERASE_RATIO = (0.3, 1 / 0.3)


def _erased(n: int, height: int, width: int, p: float, generator: torch.Generator, device) -> torch.Tensor:
    """(N, H, W) masks, each one random box with probability ``p``. One box per image for the whole
    batch at once: ``transforms.v2.RandomErasing`` on a batch tensor blanks the same box in every image."""

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator, device=device)

    area = uniform(*ERASE_AREA) * height * width
    ratio = torch.exp(uniform(math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1])))
    box_h = torch.sqrt(area * ratio).round().clamp(1, height)
    box_w = torch.sqrt(area / ratio).round().clamp(1, width)
    top = (uniform(0, 1) * (height - box_h + 1)).floor()
    left = (uniform(0, 1) * (width - box_w + 1)).floor()
    chosen = torch.rand(n, generator=generator, device=device) < p
    rows = torch.arange(height, device=device).view(1, -1)
    cols = torch.arange(width, device=device).view(1, -1)
    in_rows = (rows >= top.view(-1, 1)) & (rows < (top + box_h).view(-1, 1))
    in_cols = (cols >= left.view(-1, 1)) & (cols < (left + box_w).view(-1, 1))
    return (in_rows.unsqueeze(2) & in_cols.unsqueeze(1)) & chosen.view(-1, 1, 1)


# Test-time augmentation: the image and its four one-pixel shifts.
TTA_SHIFTS = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))


def shift(x: torch.Tensor, dx: int, dy: int, background: float) -> torch.Tensor:
    """``x`` (N, C, H, W) moved ``dx`` pixels right and ``dy`` down; uncovered pixels take ``background``."""
    if dx == 0 and dy == 0:
        return x
    height, width = x.shape[-2:]
    padded = F.pad(x, (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)), value=background)
    top, left = max(-dy, 0), max(-dx, 0)
    return padded[..., top : top + height, left : left + width]
