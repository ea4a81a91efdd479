"""Saliency as a batch computation: stack the callers' images, one engine call, split the results."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from convlens.server.engine.budget import Budget, rows_per_chunk
from convlens.server.engine.pixel_space import PixelSpace
from convlens.server.engine.saliency import SaliencyOptions, SaliencyResult, saliency
from convlens.server.engine.targets import Target, UnitTarget
from convlens.server.models.model import ServedModel

# Methods that hook no layer (Grad-CAM reads one): with a class target they may run on a folded replica.
READS_NO_LAYER = frozenset({"gradient", "guided_backprop", "deconvnet", "smoothgrad", "integrated_gradients"})


@dataclass(frozen=True)
class SaliencyPayload:
    options: SaliencyOptions
    image: torch.Tensor  # normalised [3, H, W], cpu
    target: Target | None
    baseline: torch.Tensor | None = None  # normalised [3, H, W] for ig_baseline == "image"
    chunk_pixels: int = Budget.chunk_pixels  # input pixels per forward/backward chunk (the server's budget)

    @property
    def batch_key(self) -> Hashable:
        """Requests that can share one forward/backward: same options, input shape and target layer."""
        layer = self.target.layer if isinstance(self.target, UnitTarget) else None
        return (self.options, tuple(self.image.shape), layer)


def compute_saliency(model: ServedModel, payloads: Sequence[SaliencyPayload]) -> list[SaliencyResult]:
    """One batch; every payload shares `batch_key`, hence the options."""
    options = payloads[0].options
    if options.method in READS_NO_LAYER and not any(isinstance(p.target, UnitTarget) for p in payloads):
        model = model.folded or model  # --fold-batchnorm (models/fold.py)
    inputs = model.batch([p.image for p in payloads])
    baselines = None
    if options.ig_baseline == "image":
        baselines = model.batch([p.image if p.baseline is None else p.baseline for p in payloads])
    space = PixelSpace(mean=model.preprocess.mean, std=model.preprocess.std)
    chunk = rows_per_chunk(int(inputs.shape[-2]) * int(inputs.shape[-1]), payloads[0].chunk_pixels)
    return saliency(model.module, inputs, [p.target for p in payloads], options, space, baselines=baselines,
                    resolver=model.resolver, chunk=chunk)
