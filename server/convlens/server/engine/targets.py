"""What a technique explains or excites: a class logit, a unit, or a whole channel of a layer.

A target turns one sample's forward pass (its logits and the captured layer outputs) into one scalar.
Summing those scalars over a batch and backpropagating once gives every sample its own gradient, because
in eval mode no sample's output depends on another's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from convlens.server.engine.layers import LayerResolver, not_a_map
from convlens.server.errors import InvalidArgument

REDUCTIONS = ("mean", "max")
_LIST_LAYERS = "list the model's layers with GetModel (`convlens layers MODEL`)"


@dataclass(frozen=True)
class ClassTarget:
    """A class logit (pre-softmax), as the lecture insists: the probability can rise by lowering others."""

    index: int


@dataclass(frozen=True)
class UnitTarget:
    """Channel `channel` of the output of module `layer` (a named_modules() name).

    With y and x: the activation at that position. Without: the channel reduced over all positions.
    """

    layer: str
    channel: int
    y: int | None = None  # both or neither
    x: int | None = None
    reduction: str = "mean"  # "mean" | "max" over positions when y/x are None


Target = ClassTarget | UnitTarget


def validate_target(
    layers: LayerResolver,
    target: Target | None,
    *,
    num_classes: int,
) -> None:
    """Raise InvalidArgument / NotFound naming the proto field when `target` cannot be computed.

    `layers` is the model's resolver, which knows one image's output shape per layer: (C, H, W) for
    maps, (N,) for vectors.
    """
    if target is None:
        return
    if isinstance(target, ClassTarget):
        if not 0 <= target.index < num_classes:
            raise InvalidArgument(
                f"class index {target.index} is out of range: the model has {num_classes} classes "
                f"(valid 0..{num_classes - 1})",
                field="target.class_index",
            )
        return
    shape = layers.output_shape(target.layer, field="target.unit.layer")
    if shape is not None:
        _validate_unit(target, shape)


def _validate_unit(target: UnitTarget, shape: tuple[int, ...]) -> None:
    """Check `target` against one image's output shape of its layer (no batch dimension)."""
    if len(shape) == 0:
        raise InvalidArgument(
            f"layer {target.layer!r} outputs a scalar per image; choose a layer with channels",
            field="target.unit.layer",
        )
    channels = shape[0]
    if not 0 <= target.channel < channels:
        raise InvalidArgument(
            f"channel {target.channel} is out of range for layer {target.layer!r}: it has {channels} "
            f"channels (valid 0..{channels - 1})",
            field="target.unit.channel",
        )
    if (target.y is None) != (target.x is None):
        raise InvalidArgument(
            "set both y and x (one position) or neither (the whole channel)",
            field="target.unit.y" if target.y is None else "target.unit.x",
        )
    if target.y is not None and target.x is not None:
        if len(shape) != 3:
            raise not_a_map(target.layer, shape, "target.unit.y", hint="; leave y and x unset for it")
        height, width = shape[1], shape[2]
        for name, value, size in (("y", target.y, height), ("x", target.x, width)):
            if not 0 <= value < size:
                raise InvalidArgument(
                    f"{name} = {value} is out of range for layer {target.layer!r}, whose map is "
                    f"{height}x{width} (valid {name} 0..{size - 1})",
                    field=f"target.unit.{name}",
                )
    elif target.reduction not in REDUCTIONS:
        raise InvalidArgument(
            f"unknown reduction {target.reduction!r}; use one of {', '.join(REDUCTIONS)}",
            field="target.unit.reduction",
        )


def resolve_targets(logits: torch.Tensor, targets: Sequence[Target | None]) -> list[Target]:
    """Replace each None by its sample's top-1 class."""
    top1 = logits.detach().argmax(dim=1).tolist()
    return [t if t is not None else ClassTarget(int(top1[i])) for i, t in enumerate(targets)]


def target_values(
    logits: torch.Tensor, outputs: Mapping[str, torch.Tensor], targets: Sequence[Target]
) -> torch.Tensor:
    """[N] the value of each row's target; differentiable. `outputs` are captured layer outputs [N, ...]."""
    values = []
    for i, target in enumerate(targets):
        if isinstance(target, ClassTarget):
            if not 0 <= target.index < logits.shape[1]:
                raise InvalidArgument(
                    f"class index {target.index} is out of range (valid 0..{logits.shape[1] - 1})",
                    field="target.class_index",
                )
            values.append(logits[i, target.index])
            continue
        output = outputs.get(target.layer)
        if output is None:
            raise InvalidArgument(
                f"layer {target.layer!r} did not run in the forward pass (or does not output a tensor); "
                f"choose another, {_LIST_LAYERS}",
                field="target.unit.layer",
            )
        _validate_unit(target, tuple(output.shape[1:]))
        channel = output[i, target.channel]
        if target.y is not None and target.x is not None:
            values.append(channel[target.y, target.x])
        elif target.reduction == "max":
            values.append(channel.amax())
        else:
            values.append(channel.mean())
    return torch.stack(values) if values else logits.new_zeros(0)
