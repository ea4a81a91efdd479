"""How 0..255 pixels become a model's input: (x / 255 - mean) / std per channel.

One class for every technique that works on pixels (saliency's baselines and noise, Dream, StyleTransfer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PixelSpace:
    """How 0..255 pixels map to the model's input: (x / 255 - mean) / std."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
        normalized: torch.Tensor = (pixels / 255.0 - mean) / std
        return normalized
