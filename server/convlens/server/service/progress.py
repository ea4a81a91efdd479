"""What the streaming optimisations (Dream, StyleTransfer) share: progress events, pictures, caller pixels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from convlens.server.models.preprocess import as_rgb
from convlens.server.service.images import ImageInput, to_array


@dataclass
class Progress:
    step: int  # steps done, 1-based
    total_steps: int
    terms: dict[str, float]  # named loss / objective values at this step
    preview: Image.Image | None = None  # when the caller asked for previews and this step is one
    octave: int | None = None  # Dream: the octave the step ran in


def picture(pixels: torch.Tensor) -> Image.Image:
    """A [3, H, W] 0..255 tensor as an RGB picture."""
    array = pixels.detach().to("cpu", torch.float32).clamp(0, 255).round().to(torch.uint8)
    return Image.fromarray(np.ascontiguousarray(array.permute(1, 2, 0).numpy()), mode="RGB")


def wants_preview(every: int, step: int, total: int) -> bool:
    return every > 0 and (step % every == 0) and step < total


def caller_pixels(image: ImageInput, field: str) -> torch.Tensor:
    """The caller's image as a float32 [3, H, W] tensor on the 0..255 scale (decoded, size-bounded, RGB).
    Runs off the event loop. Errors name `field`."""
    rgb = as_rgb(to_array(image, field), field=field)
    array = np.clip(rgb.astype(np.float32, copy=False), 0.0, 255.0)
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).contiguous()
