"""The one layer resolver: a model's layer names -> modules, output shapes and receptive fields.

A served model builds one per replica (`ServedModel.resolver`) and hands it to the engine functions that
take a layer name; they ask it instead of walking `named_modules()` themselves. It owns the three layer
errors, each naming the request field it concerns:

- not found   (NotFound):        no module of that name;
- not a map   (InvalidArgument): the layer's output is not a (C, H, W) map per image;
- no weights  (InvalidArgument): the layer has no 4-D convolution weight.

It also remembers the facts the engine derives once per model (the default Grad-CAM layer per input
size, a conv's dead channels): they live and die with the replica, never in module globals.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Any, TypeVar

import torch
from torch import nn

from convlens.server.engine.receptive_field import ReceptiveField
from convlens.server.errors import InvalidArgument, NotFound

T = TypeVar("T")


def not_found(name: str, field: str, model_name: str | None = None, *, hint: str = "") -> NotFound:
    model = model_name or "MODEL"
    whose = f"model {model_name!r} has" if model_name else "the model has"
    return NotFound(f"no layer {name!r}: {whose} no such module; list its layers with GetModel "
                    f"(`convlens layers {model}`){hint}", field=field, reason="LAYER_NOT_FOUND")


def not_a_map(name: str, shape: tuple[int, ...] | None, field: str, *, hint: str = "") -> InvalidArgument:
    got = "no tensor" if shape is None else f"shape {tuple(shape)} per image"
    return InvalidArgument(f"layer {name!r} outputs {got}, not a (C, H, W) map{hint}", field=field)


def no_weights(name: str, module: nn.Module, field: str) -> InvalidArgument:
    return InvalidArgument(
        f"layer {name!r} ({type(module).__name__}) has no convolution weights; choose a layer whose "
        "catalog entry has has_filters = true", field=field)


class LayerResolver:
    """Names -> modules of `model` (root excluded), with one image's output shape per layer when known.

    `shapes` and `fields` come from the model's catalog (one traced forward at its input size); a
    resolver built without them still resolves names and leaves shape checks to the real outputs.
    """

    def __init__(self, model: nn.Module, *, shapes: Mapping[str, tuple[int, ...]] | None = None,
                 fields: Mapping[str, ReceptiveField | None] | None = None,
                 model_name: str | None = None) -> None:
        self.model = model
        self.model_name = model_name
        self._modules: dict[str, nn.Module] = {name: m for name, m in model.named_modules() if name}
        self._names: dict[int, str] = {}
        for name, m in self._modules.items():
            self._names.setdefault(id(m), name)  # a module registered twice keeps its first name
        self._shapes = dict(shapes or {})
        self._fields = dict(fields or {})
        self._facts: dict[Hashable, Any] = {}

    def __contains__(self, name: object) -> bool:
        return name in self._modules

    def __iter__(self) -> Iterator[str]:
        return iter(self._modules)

    def items(self) -> Iterator[tuple[str, nn.Module]]:
        return iter(self._modules.items())

    def name_of(self, module: nn.Module) -> str | None:
        return self._names.get(id(module))

    def module(self, name: str, *, field: str = "layer") -> nn.Module:
        """The module called `name`; NotFound naming `field` otherwise."""
        module: nn.Module | None = self._modules.get(name)
        if module is None:
            raise not_found(name, field, self.model_name)
        return module

    def output_shape(self, name: str, *, field: str = "layer") -> tuple[int, ...] | None:
        """One image's output shape ((C, H, W) for maps; () when it did not run); None when unknown."""
        self.module(name, field=field)
        if not self._shapes:
            return None
        if name not in self._shapes:  # a module the catalog does not list (e.g. the root's helpers)
            raise not_found(name, field, self.model_name)
        return self._shapes[name]

    def map_shape(self, name: str, *, field: str = "layer", hint: str = "") -> tuple[int, int, int] | None:
        """(C, H, W) of a map layer; not_a_map when the catalog says otherwise; None when unknown."""
        shape = self.output_shape(name, field=field)
        if shape is None:
            return None
        if len(shape) != 3:
            raise not_a_map(name, shape, field, hint=hint)
        return shape[0], shape[1], shape[2]

    def receptive_field(self, name: str, *, field: str = "layer") -> ReceptiveField | None:
        self.module(name, field=field)
        return self._fields.get(name)

    def conv(self, name: str, *, field: str = "layer") -> nn.Module:
        """The module called `name`, which must carry a 4-D convolution weight."""
        module = self.module(name, field=field)
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
            raise no_weights(name, module, field)
        return module

    def remember(self, key: Hashable, compute: Callable[[], T]) -> T:
        """A fact about this model, computed on first use and kept with the resolver (served weights
        never change). Two threads asking at once at worst compute it twice; both get equal answers."""
        if key not in self._facts:
            self._facts[key] = compute()
        value: T = self._facts[key]
        return value


def resolver_for(model: nn.Module, resolver: LayerResolver | None) -> LayerResolver:
    """The caller's resolver, or a shape-less one for a bare module (engine tests, scripts)."""
    if resolver is not None:
        return resolver
    return LayerResolver(model)
