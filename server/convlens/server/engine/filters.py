"""Convolution weights of a layer, and the dead channels after it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from convlens.server.engine.hooks import forward_hooks
from convlens.server.engine.layers import LayerResolver


@dataclass
class FilterWeights:
    weights: np.ndarray  # float32 [out, in/groups, kh, kw]
    bias: np.ndarray | None
    dead_channels: list[int]
    layer_type: str
    groups: int
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]


def conv_filters(lookup: LayerResolver, layer: str, example: torch.Tensor | None = None) -> FilterWeights:
    """The weights of `layer`; `example` (one normalised input) lets us find the BatchNorm it feeds."""
    module = lookup.conv(layer, field="layer")
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    bias = getattr(module, "bias", None)
    return FilterWeights(
        weights=weight.detach().float().cpu().contiguous().numpy().copy(),
        bias=bias.detach().float().cpu().numpy().copy() if isinstance(bias, torch.Tensor) else None,
        dead_channels=dead_channels(lookup, layer, example) if example is not None else [],
        layer_type=type(module).__name__,
        groups=int(getattr(module, "groups", 1)),
        stride=_pair(getattr(module, "stride", (1, 1))),
        padding=_pair(getattr(module, "padding", (0, 0))),
        dilation=_pair(getattr(module, "dilation", (1, 1))),
    )


def dead_channels(lookup: LayerResolver, layer: str, example: torch.Tensor) -> list[int]:
    """Output channels of conv `layer` that its following BatchNorm zeroes out (running_var == 0).

    "Following" is found from the data flow of one forward pass (the BatchNorm whose input is the
    conv's output tensor), not from registration order, so any architecture is read correctly. Served
    weights never change, so the answer is remembered by the model's resolver.
    """
    conv = lookup.conv(layer, field="layer")
    found = lookup.remember(("filters.dead_channels", layer),
                            lambda: _find_dead_channels(lookup.model, conv, example))
    return list(found)


def _find_dead_channels(model: nn.Module, conv: nn.Module, example: torch.Tensor) -> list[int]:
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or not isinstance(model, nn.Module):
        return []
    produced: list[torch.Tensor] = []
    consumer: list[nn.Module] = []

    def on_conv(_m: nn.Module, _i: object, out: torch.Tensor) -> None:
        produced.append(out)

    def on_norm(m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if produced and not consumer and args and args[0] is produced[0]:
            consumer.append(m)

    with forward_hooks([(conv, on_conv)], pre_hooks=[(n, on_norm) for n in norms]), torch.no_grad():
        model(example.unsqueeze(0))
    running_var = getattr(consumer[0], "running_var", None) if consumer else None
    if not isinstance(running_var, torch.Tensor):
        return []
    return [int(i) for i in torch.nonzero(running_var == 0).flatten().tolist()]


def _pair(value: object) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, str):  # padding="same"/"valid"
        return ()
    if not isinstance(value, Iterable):
        raise TypeError(f"expected an int, a string or a sequence of ints, got {value!r}")
    return tuple(int(v) for v in value)
