"""The layer catalog: every named module with its output shape and receptive field at the input size."""

from __future__ import annotations

import logging

import torch
from torch import nn

from convlens.server.engine.receptive_field import trace_layers
from convlens.server.models.model import LayerSpec, Preprocess

log = logging.getLogger("convlens.models")


def has_filters(module: nn.Module) -> bool:
    """Conv-like: a 4-D `weight` tensor (Conv2d and subclasses, TorchScript convs, ONNX pseudo-convs)."""
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.ndim == 4


def type_name(module: nn.Module) -> str:
    # A TorchScript submodule's class is RecursiveScriptModule; the source class name is kept here.
    return getattr(module, "original_name", None) or type(module).__name__


def build_catalog(module: nn.Module, pre: Preprocess, *, device: torch.device | None = None,
                  receptive_fields: bool = True) -> list[LayerSpec]:
    """LayerSpecs of every named module (root excluded), in registration order.

    One forward of a zero image at the model's input size gives the shapes (batch dim dropped;
    () for modules that did not run) and, traced, the receptive fields (None where untraceable).
    """
    if device is None:
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
    example = torch.zeros(1, 3, pre.height, pre.width, device=device)
    try:
        traces = trace_layers(module, example, receptive_fields=receptive_fields)
    except Exception as exc:  # a model that cannot run at its declared size still lists its layers
        log.warning("could not run %s on a %dx%d input to read layer shapes: %s",
                    type(module).__name__, pre.height, pre.width, exc)
        traces = {}
    specs = []
    for name, sub in module.named_modules():
        if not name:
            continue
        trace = traces.get(name)
        specs.append(LayerSpec(
            name=name,
            type=type_name(sub),
            output_shape=trace.output_shape if trace else (),
            parameter_count=sum(p.numel() for p in sub.parameters()),
            receptive_field=trace.receptive_field if trace else None,
            has_filters=has_filters(sub),
        ))
    return specs
