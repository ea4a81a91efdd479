"""Outputs of a few layers for a batch, with the forward cut short after the last of them.

Dream and style transfer read layers in the middle of the network, and the TopActivations scan one layer;
the rest of the forward (and its backward) would be wasted work, so the hook of the last needed layer
stops the forward once every layer has been captured. Gradients still flow from the captured tensors to
the input. The one place the engine stops a forward early.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from convlens.server.engine.hooks import ForwardHook, forward_hooks
from convlens.server.engine.layers import not_found
from convlens.server.engine.pixel_space import PixelSpace
from convlens.server.errors import NotFound


class _Enough(Exception):
    """Raised by the last hook: every layer asked for has been seen."""


def layer_outputs(model: nn.Module, inputs: torch.Tensor, layers: Sequence[str], *, field: str = "layer"
                  ) -> dict[str, torch.Tensor]:
    """Outputs of `layers` (their first tensor output) for model inputs [B, 3, H, W], running the forward
    only as far as the last of them (the graph to `inputs` kept when it has one)."""
    wanted = list(dict.fromkeys(layers))
    modules = dict(model.named_modules())
    for name in wanted:
        if name not in modules:
            raise not_found(name, field)
    captured: dict[str, torch.Tensor] = {}

    def hook_for(name: str) -> ForwardHook:
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
            model(inputs)
        except _Enough:
            pass
    missing = [name for name in wanted if name not in captured]
    if missing:
        raise NotFound(f"layer(s) {', '.join(missing)} produced no tensor output", field=field,
                       reason="LAYER_WITHOUT_OUTPUT")
    return captured


def layer_features(
    model: nn.Module, pixels: torch.Tensor, layers: Sequence[str], space: PixelSpace, *, field: str = "layer"
) -> dict[str, torch.Tensor]:
    """Outputs of `layers` for pixels [B, 3, H, W] in 0..255 (the graph to `pixels` kept when it has one)."""
    return layer_outputs(model, space.normalize(pixels), layers, field=field)
