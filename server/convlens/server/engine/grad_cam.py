"""Grad-CAM (Selvaraju et al. 2017): where in a layer's map the evidence for a target lies.

    weights_k = mean over positions of d target / d A_k
    cam       = relu(sum_k weights_k * A_k), upsampled bilinearly to the input size (as in the paper;
                Captum's GuidedGradCam defaults to "nearest", its LayerGradCam leaves it to the caller).

The default layer is the last module, in execution order, whose output is a 4-D map larger than 1x1 and
that is not a pooling / dropout / identity layer (nor a container whose output is such a layer's): the
deepest conv block before global pooling. For ResNets that is `layer4`, for VGG the last ReLU of
`features`, for the served EfficientNet-Lite0 `_act1`: the head's ReLU6 after `_conv_head` / `_bn1`,
7x7 at 224 px, just before `_avg_pooling`. (A Lite port that applies the head activation functionally
gets `_bn1`, the pre-activation head map.) A module that runs several times per forward counts by its
last run.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from convlens.server.engine.hooks import eval_mode, forward_hooks
from convlens.server.engine.layers import LayerResolver, not_a_map, resolver_for
from convlens.server.errors import InvalidArgument

_NOT_A_MAP = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d,
    nn.Dropout, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity, nn.Flatten,
)

def default_cam_layer(model: nn.Module, *, input_size: tuple[int, int] = (224, 224),
                      resolver: LayerResolver | None = None) -> str:
    """The default Grad-CAM layer for inputs of `input_size` (one no-grad probe, remembered by the
    model's resolver)."""
    lookup = resolver_for(model, resolver)
    layer: str = lookup.remember(("grad_cam.default_layer", tuple(input_size)),
                                 lambda: _probe_default(model, lookup, input_size))
    return layer


def _probe_default(model: nn.Module, lookup: LayerResolver, input_size: tuple[int, int]) -> str:
    excluded: list[torch.Tensor] = []  # outputs of pooling-like layers (kept alive for `is` checks)
    best: list[str] = []

    def hook(module: nn.Module, inputs: Any, output: Any) -> None:
        if not isinstance(output, torch.Tensor):
            return
        if isinstance(module, _NOT_A_MAP) or any(output is t for t in excluded):
            excluded.append(output)
        elif output.dim() == 4 and output.shape[2] * output.shape[3] > 1:
            best.append(lookup.name_of(module) or "")

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    probe = torch.zeros(1, 3, *input_size, device=device, dtype=dtype)
    modules = {id(m): m for _, m in lookup.items()}.values()  # each module once, even if registered twice
    with torch.no_grad(), eval_mode(model), forward_hooks((m, hook) for m in modules):
        model(probe)
    if not best:
        raise InvalidArgument(
            f"model has no layer with a spatial map larger than 1x1 at input size {input_size}; "
            "Grad-CAM needs a conv layer",
            field="grad_cam.layer",
        )
    return best[-1]


def check_cam_layer(lookup: LayerResolver, layer: str) -> None:
    lookup.module(layer, field="grad_cam.layer")
    lookup.map_shape(layer, field="grad_cam.layer", hint="; Grad-CAM needs a conv block")


def cam_from(activation: torch.Tensor | None, gradient: torch.Tensor | None, layer: str,
             size: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """([N, 1, H, W] upsampled CAM, (h, w)) from the layer's output A and d target / d A, [N, K, h, w]."""
    if activation is None or activation.dim() != 4:
        shape = None if activation is None else tuple(activation.shape[1:])
        raise not_a_map(layer, shape, "grad_cam.layer", hint="; Grad-CAM needs a conv block")
    if gradient is None:  # the target does not depend on this layer (e.g. a unit before it)
        gradient = torch.zeros_like(activation)
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activation).sum(dim=1, keepdim=True))
    upsampled = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)
    return upsampled, (int(activation.shape[2]), int(activation.shape[3]))
