"""Saliency as a batch computation: stack the callers' images, one engine call, split the results."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from convlens.server.engine.saliency import InputSpace, SaliencyOptions, SaliencyResult, saliency
from convlens.server.engine.targets import Target, UnitTarget
from convlens.server.models.model import ServedModel


@dataclass(frozen=True)
class SaliencyPayload:
    options: SaliencyOptions
    image: torch.Tensor  # normalised [3, H, W], cpu
    target: Target | None
    baseline: torch.Tensor | None = None  # normalised [3, H, W] for ig_baseline == "image"

    @property
    def batch_key(self) -> Hashable:
        """Requests that can share one forward/backward: same options, input shape and target layer."""
        layer = self.target.layer if isinstance(self.target, UnitTarget) else None
        return (self.options, tuple(self.image.shape), layer)


def compute_saliency(model: ServedModel, payloads: Sequence[SaliencyPayload]) -> list[SaliencyResult]:
    """One batch; every payload shares `batch_key`, hence the options."""
    options = payloads[0].options
    inputs = model.batch([p.image for p in payloads])
    baselines = None
    if options.ig_baseline == "image":
        baselines = model.batch([p.image if p.baseline is None else p.baseline for p in payloads])
    space = InputSpace(mean=model.preprocess.mean, std=model.preprocess.std)
    return saliency(model.module, inputs, [p.target for p in payloads], options, space, baselines=baselines,
                    resolver=model.resolver)
