"""One layer's activations for a batch, turned into top-k candidates: the scan step every builder shares.

Every builder runs `scan_candidates`: `convlens index build` (one process or a Kubernetes shard) and the Ray
actors through `scan_batch` (the batch's partial index), the server's scheduler directly
(compute/top_activations.compute_scan: one candidate row per caller, so a batch may mix index scans);
only the way images reach it differs. The forward stops at the layer (layer_features.layer_outputs), so an
early layer costs a fraction of a full forward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from convlens.server.engine.layer_features import layer_outputs
from convlens.server.engine.topk.candidates import DEFAULT_PER_IMAGE, Candidates, candidates
from convlens.server.engine.topk.index import ImageId, TopKIndex, from_candidates


@torch.no_grad()
def layer_output(module: nn.Module, layer: str, inputs: torch.Tensor, *, channels_last: bool = False
                 ) -> torch.Tensor:
    """The output of module `layer` (its first call) for a batch, without running the rest of the model."""
    if channels_last and inputs.ndim == 4:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    output: torch.Tensor = layer_outputs(module, inputs, [layer])[layer].detach()
    return output


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
