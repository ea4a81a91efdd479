"""Objectives: one sample's forward pass (its row of the batch) -> a scalar to MAXIMISE.

They compose like Lucent's: `a + b`, `a - b`, `2.0 * a`, `-a`; `layers` says which layer outputs a
composite reads (the step runner captures exactly those). `terms(acts, row)` names every leaf's value,
for progress events. A job that minimises a loss (style, content) uses `-objective` or its own loss.

Leaves: `ClassLogit` (pre-softmax, as the lecture insists), `UnitActivation` (c, y, x), `ChannelMean`,
`ChannelMax`, `LayerL2` (DeepDream's 0.5 * mean a^2: its gradient is the activations, "set delta equal to
the activations"), and `Custom` for anything else (a guide's dot product, a Gram or content distance).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch


@dataclass
class Activations:
    """One batched forward: logits [N, K] and the captured layer outputs {layer: [N, ...]}."""

    logits: torch.Tensor
    outputs: Mapping[str, torch.Tensor]

    def layer(self, name: str, row: int) -> torch.Tensor:
        return self.outputs[name][row]


class Objective:
    name: str = "objective"
    layers: frozenset[str] = frozenset()

    def __call__(self, acts: Activations, row: int) -> torch.Tensor:
        raise NotImplementedError

    def terms(self, acts: Activations, row: int) -> dict[str, torch.Tensor]:
        return {self.name: self(acts, row)}

    def __add__(self, other: Objective) -> Objective:
        return Sum(((1.0, self), (1.0, other)))

    def __sub__(self, other: Objective) -> Objective:
        return Sum(((1.0, self), (-1.0, other)))

    def __mul__(self, weight: float) -> Objective:
        return Sum(((float(weight), self),))

    __rmul__ = __mul__

    def __neg__(self) -> Objective:
        return Sum(((-1.0, self),))


class Sum(Objective):
    """sum_i w_i * objective_i; nested sums flatten, so `terms` names every leaf once."""

    parts: tuple[tuple[float, Objective], ...]

    def __init__(self, parts: tuple[tuple[float, Objective], ...]) -> None:
        flat: list[tuple[float, Objective]] = []
        for weight, part in parts:
            if isinstance(part, Sum):
                flat.extend((weight * w, p) for w, p in part.parts)
            else:
                flat.append((weight, part))
        self.parts = tuple(flat)
        self.layers = frozenset().union(*(p.layers for _, p in self.parts))
        self.name = " + ".join(p.name for _, p in self.parts)

    def __call__(self, acts: Activations, row: int) -> torch.Tensor:
        return torch.stack([w * p(acts, row) for w, p in self.parts]).sum()

    def terms(self, acts: Activations, row: int) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for _, part in self.parts:
            out.update(part.terms(acts, row))
        return out


class ClassLogit(Objective):
    def __init__(self, index: int) -> None:
        self.index = index
        self.name = f"logit[{index}]"

    def __call__(self, acts: Activations, row: int) -> torch.Tensor:
        return acts.logits[row, self.index]


class UnitActivation(Objective):
    def __init__(self, layer: str, channel: int, y: int, x: int) -> None:
        self.layer, self.channel, self.y, self.x = layer, channel, y, x
        self.layers = frozenset({layer})
        self.name = f"{layer}[{channel},{y},{x}]"

    def __call__(self, acts: Activations, row: int) -> torch.Tensor:
        return acts.layer(self.layer, row)[self.channel, self.y, self.x]


class ChannelMean(Objective):
    def __init__(self, layer: str, channel: int) -> None:
        self.layer, self.channel = layer, channel
        self.layers = frozenset({layer})
        self.name = f"{layer}[{channel}].mean"

    def __call__(self, acts: Activations, row: int) -> torch.Tensor:
        return acts.layer(self.layer, row)[self.channel].mean()


class ChannelMax(Objective):
    def __init__(self, layer: str, channel: int) -> None:
        self.layer, self.channel = layer, channel
        self.layers = frozenset({layer})
        self.name = f"{layer}[{channel}].max"

    def __call__(self, acts: Activations, row: int) -> torch.Tensor:
        return acts.layer(self.layer, row)[self.channel].amax()


class LayerL2(Objective):
    """0.5 * mean over the layer (or one channel) of a^2: DeepDream's objective."""

    def __init__(self, layer: str, channel: int | None = None) -> None:
        self.layer, self.channel = layer, channel
        self.layers = frozenset({layer})
        self.name = f"{layer}.l2" if channel is None else f"{layer}[{channel}].l2"

    def __call__(self, acts: Activations, row: int) -> torch.Tensor:
        a = acts.layer(self.layer, row)
        if self.channel is not None:
            a = a[self.channel]
        return 0.5 * (a * a).mean()


class Custom(Objective):
    """Any function of (acts, row) -> scalar, reading `layers`; e.g. a guide image's feature dot product,
    or minus a style (Gram) / content distance."""

    def __init__(self, name: str, layers: frozenset[str] | set[str],
                 fn: Callable[[Activations, int], torch.Tensor]) -> None:
        self.name, self.layers, self.fn = name, frozenset(layers), fn

    def __call__(self, acts: Activations, row: int) -> torch.Tensor:
        return self.fn(acts, row)
