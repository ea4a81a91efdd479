"""Features of a few layers for a batch of 0..255 pixel images, with the forward cut short after the last.

Dream and style transfer read layers in the middle of the network; the rest of the forward (and its
backward) would be wasted work, so the hook of the last needed layer stops the forward once every layer
has been captured. Gradients still flow from the captured tensors to the pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from convlens.server.engine.hooks import forward_hooks
from convlens.server.engine.layers import not_found
from convlens.server.errors import NotFound


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


class _Enough(Exception):
    """Raised by the last hook: every layer asked for has been seen."""


def layer_features(
    model: nn.Module, pixels: torch.Tensor, layers: Sequence[str], space: PixelSpace, *, field: str = "layer"
) -> dict[str, torch.Tensor]:
    """Outputs of `layers` for pixels [B, 3, H, W] in 0..255 (the graph to `pixels` kept when it has one)."""
    wanted = list(dict.fromkeys(layers))
    modules = dict(model.named_modules())
    for name in wanted:
        if name not in modules:
            raise not_found(name, field)
    captured: dict[str, torch.Tensor] = {}

    def hook_for(name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
            if not isinstance(output, torch.Tensor):
                return None
            captured[name] = output
            if len(captured) == len(wanted):
                raise _Enough
            return output.clone()  # an inplace op downstream must not change what was captured

        return hook

    with forward_hooks((modules[name], hook_for(name)) for name in wanted):
        try:
            model(space.normalize(pixels))
        except _Enough:
            pass
    missing = [name for name in wanted if name not in captured]
    if missing:
        raise NotFound(f"layer(s) {', '.join(missing)} produced no tensor output", field=field,
                       reason="LAYER_WITHOUT_OUTPUT")
    return captured
