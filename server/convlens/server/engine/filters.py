"""Convolution weights of a layer, and the dead channels after it."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from convlens.server.errors import InvalidArgument, NotFound


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


def get_submodule(model: nn.Module, layer: str, *, field: str = "layer") -> nn.Module:
    try:
        return model.get_submodule(layer) if layer else model
    except AttributeError:
        raise NotFound(f"no layer {layer!r}; list the layers with GetModel", field=field) from None


def conv_filters(model: nn.Module, layer: str, example: torch.Tensor | None = None) -> FilterWeights:
    """The weights of `layer`; `example` (one normalised input) lets us find the BatchNorm it feeds."""
    module = get_submodule(model, layer)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        raise InvalidArgument(
            f"layer {layer!r} ({type(module).__name__}) has no convolution weights; "
            "choose a layer whose catalog entry has has_filters = true",
            field="layer",
        )
    bias = getattr(module, "bias", None)
    return FilterWeights(
        weights=weight.detach().float().cpu().numpy().copy(),
        bias=bias.detach().float().cpu().numpy().copy() if isinstance(bias, torch.Tensor) else None,
        dead_channels=dead_channels(model, module, example) if example is not None else [],
        layer_type=type(module).__name__,
        groups=int(getattr(module, "groups", 1)),
        stride=_pair(getattr(module, "stride", (1, 1))),
        padding=_pair(getattr(module, "padding", (0, 0))),
        dilation=_pair(getattr(module, "dilation", (1, 1))),
    )


# Served weights never change, so each conv's answer is computed once (the key dies with the module).
_DEAD: weakref.WeakKeyDictionary[nn.Module, list[int]] = weakref.WeakKeyDictionary()


def dead_channels(model: nn.Module, conv: nn.Module, example: torch.Tensor) -> list[int]:
    """Output channels of `conv` that its following BatchNorm zeroes out (running_var == 0).

    "Following" is found from the data flow of one forward pass (the BatchNorm whose input is the
    conv's output tensor), not from registration order, so any architecture is read correctly.
    """
    if conv not in _DEAD:
        _DEAD[conv] = _find_dead_channels(model, conv, example)
    return list(_DEAD[conv])


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

    handles = [conv.register_forward_hook(on_conv)]
    handles += [n.register_forward_pre_hook(on_norm) for n in norms]
    try:
        with torch.no_grad():
            model(example.unsqueeze(0))
    finally:
        for h in handles:
            h.remove()
    if not consumer or consumer[0].running_var is None:
        return []
    return [int(i) for i in torch.nonzero(consumer[0].running_var == 0).flatten().tolist()]


def _pair(value: object) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, str):  # padding="same"/"valid"
        return ()
    return tuple(int(v) for v in value)  # type: ignore[union-attr]
