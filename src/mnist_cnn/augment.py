"""Random affine augmentation of a whole batch on its own device: shift, rotation and scale.

One ``affine_grid``/``grid_sample`` call per batch, so it runs where training runs (GPU or CPU) and
costs a small fraction of a step; per-sample PIL transforms would starve a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AffineRanges:
    """Uniform ranges: shifts up to ``shift`` pixels, rotations up to ``rotate`` degrees, scale 1 ± ``scale``."""

    shift: float = 0.0
    rotate: float = 0.0
    scale: float = 0.0

    @property
    def active(self) -> bool:
        return self.shift > 0 or self.rotate > 0 or self.scale > 0


def _uniform(n: int, half_width: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return (torch.rand(n, generator=generator, device=device) * 2 - 1) * half_width


def random_affine(x: torch.Tensor, ranges: AffineRanges, generator: torch.Generator, background: float) -> torch.Tensor:
    """``x`` (N, C, H, W) moved by one random affine map per image; uncovered pixels take ``background``
    (the normalised value of a blank pixel, not 0, which normalised data would read as ink)."""
    n, _, height, width = x.shape
    device = x.device
    angle = _uniform(n, math.radians(ranges.rotate), generator, device)
    scale = 1 + _uniform(n, ranges.scale, generator, device)
    # affine_grid maps output to input coordinates in [-1, 1]: one pixel is 2 / size.
    shift_x = _uniform(n, ranges.shift * 2 / width, generator, device)
    shift_y = _uniform(n, ranges.shift * 2 / height, generator, device)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift_x], 1), torch.stack([sin, cos, shift_y], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    moved = F.grid_sample(x - background, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return moved + background


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
