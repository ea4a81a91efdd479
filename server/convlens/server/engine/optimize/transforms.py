"""Random transforms applied to a job's image before each forward (robustness, Lucid's standard set).

Every random number comes from the job's own `torch.Generator`, drawn on the CPU as plain numbers, and a
transform acts on that job's image only (one affine grid per sample). So a job's images never depend on
which other jobs share its batch, nor on the device.

Shapes: `pad` grows a side by 2 * p, `jitter(d)` crops it by d (a random offset in 0..d), `scale` and
`rotate` keep it. `output_size` says what a chain makes of a side, so jobs can be grouped by input shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


@dataclass(frozen=True)
class Pad:
    pixels: int
    value: float = 0.5  # grey, as Lucid pads

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        p = self.pixels
        return F.pad(image, (p, p, p, p), mode="constant", value=self.value) if p else image

    def output_size(self, side: int) -> int:
        return side + 2 * self.pixels


@dataclass(frozen=True)
class Jitter:
    """Crop `pixels` rows and columns at a random offset: a random translation of up to `pixels`."""

    pixels: int

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        d = self.pixels
        if d <= 0:
            return image
        dy, dx = (int(v) for v in torch.randint(0, d + 1, (2,), generator=generator))
        h, w = image.shape[-2:]
        return image[..., dy:dy + h - d, dx:dx + w - d]

    def output_size(self, side: int) -> int:
        return side - max(self.pixels, 0)


@dataclass(frozen=True)
class ScaleRotate:
    """Zoom by a factor in [1 - scale, 1 + scale] and rotate by up to ±degrees, about the centre, in one
    bilinear resampling (edges repeated); the side is unchanged."""

    scale: float = 0.1
    degrees: float = 10.0

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.scale <= 0 and self.degrees <= 0:
            return image
        s = _uniform(generator, 1 - self.scale, 1 + self.scale) if self.scale > 0 else 1.0
        a = math.radians(_uniform(generator, -self.degrees, self.degrees)) if self.degrees > 0 else 0.0
        cos, sin = math.cos(a) / s, math.sin(a) / s  # grid maps output to input: zoom in = shrink the grid
        theta = torch.tensor([[[cos, -sin, 0.0], [sin, cos, 0.0]]], dtype=image.dtype, device=image.device)
        grid = F.affine_grid(theta.expand(image.shape[0], 2, 3), list(image.shape), align_corners=False)
        return F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def output_size(self, side: int) -> int:
        return side


Transform = Pad | Jitter | ScaleRotate


def apply(transforms: Sequence[Transform], image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    for transform in transforms:
        image = transform(image, generator)
    return image


def output_size(transforms: Sequence[Transform], side: int) -> int:
    for transform in transforms:
        side = transform.output_size(side)
    return side


def standard(pad: int = 12, jitter: int = 8, scale: float = 0.1, degrees: float = 10.0,
             final_jitter: int = 4) -> list[Transform]:
    """Lucid's standard transforms: pad 12, jitter 8, scale 0.9..1.1, rotate ±10°, jitter 4."""
    chain: list[Transform] = []
    if pad:
        chain.append(Pad(pad))
    if jitter:
        chain.append(Jitter(jitter))
    if scale > 0 or degrees > 0:
        chain.append(ScaleRotate(scale, degrees))
    if final_jitter:
        chain.append(Jitter(final_jitter))
    return chain
