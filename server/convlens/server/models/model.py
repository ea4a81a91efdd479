"""What a served model is: a module, its preprocessing, labels and layer catalog."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property

import torch
from torch import nn

from convlens.server.engine.layers import LayerResolver, not_found
from convlens.server.engine.receptive_field import ReceptiveField
from convlens.server.errors import FailedPrecondition
from convlens.server.models.fold import fold_batchnorm


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


def forward_only(format: str, technique: str, model_name: str | None = None) -> FailedPrecondition:
    """The one wording for a technique that needs gradients asked of a model served forward-only (ONNX):
    service/context.require_gradients before any work, the ONNX module itself if a gradient is asked anyway."""
    who = f"model {model_name!r}" if model_name is not None else "this model"
    return FailedPrecondition(f"{who} is served in the {format} format, which runs forward-only here; {technique} "
                              "needs gradients: a torchvision, TorchScript or embedded model",
                              reason="GRADIENTS_UNSUPPORTED")


def copy_module(module: nn.Module) -> nn.Module:
    """A deep copy whose parameters are leaves, as the original's are, with the same `requires_grad`.

    A TorchScript module's deep copy clones each parameter in C++ (`IValue::deepcopy`); with grad mode on
    (a lane thread's default) the clones of parameters that require grad are recorded by autograd: non-leaf
    tensors hanging off the original's. Moving or re-laying them out (`Module._apply`) then reads their
    `.grad`, and torch warns about a non-leaf `.grad`. So the copy is made with grad mode off (no history)
    and the flags set again; an eager module's `Parameter.__deepcopy__` keeps them by itself.
    """
    with torch.no_grad():
        copied = copy.deepcopy(module)
    flags = {name: p.requires_grad for name, p in module.named_parameters()}
    for name, p in copied.named_parameters():
        if p.requires_grad != flags.get(name, p.requires_grad):
            p.requires_grad_(flags[name])
    return copied


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
    memory_format: torch.memory_format = torch.contiguous_format  # of the weights (and of `batch`)
    # Model control (models/repository.py): the version this copy serves, and the copy's identity: a reload
    # makes a new copy of the same version, and a batch never mixes two copies (scheduler Task.batch_key).
    version: int = 1
    copy_id: int = 0
    # The workers' replicas of this copy, per lane (scheduler/worker.py): they live and die with the copy,
    # so an unloaded or replaced copy's replicas go once its last call has finished.
    lane_replicas: dict[str, ServedModel] = field(default_factory=dict, repr=False, compare=False)
    # `--fold-batchnorm` (models/fold.py): replicas offer `folded`, BN carried by the convolutions, for
    # requests that read no layer.
    fold_batchnorm: bool = False

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

    @cached_property
    def resolver(self) -> LayerResolver:
        """The engine's view of the layers (name -> module, shape, field) and the place per-model facts
        are cached; built once per replica (a replica is a new ServedModel, so it gets its own)."""
        return LayerResolver(self.module, shapes=self.layer_shapes,
                             fields={s.name: s.receptive_field for s in self.layers}, model_name=self.name)

    def layer(self, name: str, *, field_name: str = "layer") -> LayerSpec:
        spec = self.layer_index.get(name)
        if spec is not None:
            return spec
        raise not_found(name, field_name, self.name)

    def batch(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """Stack [3, H, W] images into the batch this replica runs best on (its device and layout)."""
        return torch.stack(list(images)).to(device=self.device, memory_format=self.memory_format)

    def replica(self, device: torch.device, memory_format: torch.memory_format | None = None, *,
                fresh: bool = False) -> ServedModel:
        """This model on `device`, its weights in `memory_format` (default: as they are); the same object
        when nothing changes, unless `fresh` (a thread that registers hooks needs a module of its own). A
        changed layout copies the module: the repository's stays untouched."""
        memory_format = self.memory_format if memory_format is None else memory_format
        if not self.layout_applies:
            memory_format = torch.contiguous_format
        if device == self.device and memory_format == self.memory_format and not fresh:
            return self
        module = copy_module(self.module).to(device).eval()
        if memory_format != torch.contiguous_format:
            module = module.to(memory_format=memory_format)
        return replace(self, module=module, device=device, memory_format=memory_format, lane_replicas={})

    @cached_property
    def folded(self) -> ServedModel | None:
        """This replica with batch norm folded into its convolutions (models/fold.py), for requests that
        read no layer; None unless `fold_batchnorm`, or when nothing folds (TorchScript, ONNX, no BN, a
        module torch.fx cannot trace). Built once per replica, on the lane that first asks."""
        if not self.fold_batchnorm or self.format in ("torchscript", "onnx"):
            return None
        probe = torch.rand(1, 3, self.preprocess.height, self.preprocess.width, device=self.device,
                           generator=torch.Generator(device=self.device).manual_seed(0))
        done = fold_batchnorm(self.module, probe.contiguous(memory_format=self.memory_format))
        if done is None:
            return None
        module, _ = done
        return replace(self, module=module, lane_replicas={}, fold_batchnorm=False)

    @property
    def ref(self) -> str:
        """How a request names exactly this version: NAME@VERSION."""
        return f"{self.name}@{self.version}"

    @property
    def layout_applies(self) -> bool:
        """Whether the weights may change memory layout: ONNX models run in onnxruntime with their own."""
        return self.format != "onnx"
