"""One layer's activations for a batch, turned into top-k candidates: the scan step every builder shares.

The server's scheduler, `convlens index build` (one process or a Kubernetes shard) and the Ray actors
all call `scan_batch`; only the way images reach it differs. The forward stops at the layer (a hook
raises once it has the output), so an early layer costs a fraction of a full forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from convlens.server.engine.layers import not_found
from convlens.server.engine.topk.candidates import DEFAULT_PER_IMAGE, Candidates, candidates
from convlens.server.engine.topk.index import ImageId, TopKIndex, from_candidates
from convlens.server.errors import NotFound


class _Reached(Exception):
    """Raised by the capture hook: nothing after the layer needs computing."""


@torch.no_grad()
def layer_output(module: nn.Module, layer: str, inputs: torch.Tensor, *, channels_last: bool = False
                 ) -> torch.Tensor:
    """The output of module `layer` (its first call) for a batch, without running the rest of the model."""
    target = dict(module.named_modules()).get(layer)
    if target is None:
        raise not_found(layer, "layer")
    captured: list[torch.Tensor] = []

    def hook(_m: nn.Module, _inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            captured.append(output.detach())
            raise _Reached

    if channels_last and inputs.ndim == 4:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    handle = target.register_forward_hook(hook)
    try:
        module(inputs)
    except _Reached:
        pass
    finally:
        handle.remove()
    if not captured:
        raise NotFound(f"layer {layer!r} did not produce a tensor in the forward pass", field="layer",
                       reason="LAYER_WITHOUT_OUTPUT")
    return captured[0]


def scan_candidates(module: nn.Module, layer: str, inputs: torch.Tensor, *,
                    per_image: int = DEFAULT_PER_IMAGE, channels_last: bool = False) -> Candidates:
    """Forward a normalised batch [B, 3, H, W] to `layer` and reduce it to per-image candidates."""
    return candidates(layer_output(module, layer, inputs, channels_last=channels_last), per_image)


def scan_batch(module: nn.Module, layer: str, inputs: torch.Tensor, ids: Sequence[ImageId],
               like: TopKIndex, *, channels_last: bool = False) -> TopKIndex:
    """The index of one batch (merge it into a running index, or merge many at the end)."""
    batch = scan_candidates(module, layer, inputs, per_image=like.per_image, channels_last=channels_last)
    return from_candidates(like, ids, batch)


def empty_index(layer: str, output_shape: tuple[int, ...], *, k_max: int, per_image: int) -> TopKIndex:
    """An index for a layer whose one-image output shape is (C, H, W) or (N,)."""
    if len(output_shape) == 3:
        return TopKIndex(layer, int(output_shape[0]), (int(output_shape[1]), int(output_shape[2])), k_max,
                         per_image)
    if len(output_shape) == 1:
        return TopKIndex(layer, int(output_shape[0]), (1, 1), k_max, per_image)
    raise ValueError(f"layer {layer!r} has output shape {output_shape}: expected (C, H, W) or (N,)")
