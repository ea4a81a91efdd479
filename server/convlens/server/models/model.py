"""What a served model is: a module, its preprocessing, labels and layer catalog."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from functools import cached_property

import torch
from torch import nn

from convlens.server.errors import NotFound


@dataclass(frozen=True)
class Preprocess:
    """How a 0..255 RGB image becomes the model's input tensor.

    Resize the short side to `resize`, center-crop to (height, width), then (x/255 - mean) / std.
    An image already (height, width) is used as is.
    """

    height: int
    width: int
    resize: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass(frozen=True)
class ReceptiveField:
    """Receptive field of one output position, in input pixels.

    Output position (y, x) is centred on input (offset_y + y * jump_y, offset_x + x * jump_x)
    and spans size_y x size_x pixels around that centre.
    """

    size_y: int
    size_x: int
    jump_y: int
    jump_x: int
    offset_y: float
    offset_x: float

    def box(self, y: int, x: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), half-open, unclipped, of output position (y, x)."""
        cy = self.offset_y + y * self.jump_y
        cx = self.offset_x + x * self.jump_x
        y0 = int(round(cy - (self.size_y - 1) / 2))
        x0 = int(round(cx - (self.size_x - 1) / 2))
        return x0, y0, x0 + self.size_x, y0 + self.size_y


@dataclass(frozen=True)
class LayerSpec:
    name: str
    type: str
    output_shape: tuple[int, ...]  # one image: (C, H, W) for conv maps, (N,) for vectors
    parameter_count: int
    receptive_field: ReceptiveField | None
    has_filters: bool


@dataclass
class ServedModel:
    """A model as the engine sees it. `module` takes normalised [B, 3, H, W] and returns logits."""

    name: str
    format: str  # "embedded" | "torchvision" | "torchscript" | "onnx"
    module: nn.Module
    preprocess: Preprocess
    labels: list[str]
    supports_gradients: bool
    layers: list[LayerSpec] = field(default_factory=list)
    description: str = ""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @cached_property  # weights never change while served; summing them per ListModels cost ~0.2 ms a model
    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    @cached_property
    def layer_index(self) -> dict[str, LayerSpec]:
        return {spec.name: spec for spec in self.layers}

    @cached_property
    def layer_shapes(self) -> dict[str, tuple[int, ...]]:
        return {spec.name: spec.output_shape for spec in self.layers}

    def layer(self, name: str, *, field_name: str = "layer") -> LayerSpec:
        spec = self.layer_index.get(name)
        if spec is not None:
            return spec
        raise NotFound(
            f"model {self.name!r} has no layer {name!r}; list its layers with GetModel "
            f"(`convlens layers {self.name}`)",
            field=field_name,
        )

    def replica(self, device: torch.device) -> ServedModel:
        """This model on `device` (the same object when it is already there)."""
        if device == self.device:
            return self
        module = copy.deepcopy(self.module).to(device).eval()
        return replace(self, module=module, device=device)
