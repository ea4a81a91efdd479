"""Style transfer's one-shot work on the job's device: the style and content targets."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from convlens.server.engine.layer_features import PixelSpace
from convlens.server.engine.optimize.style import StyleSettings, StyleTargets, make_targets
from convlens.server.models.model import ServedModel


@dataclass(frozen=True)
class TargetsPayload:
    content: torch.Tensor  # [3, H, W] 0..255 at the output size, cpu
    style: torch.Tensor  # [3, H', W'] 0..255
    settings: StyleSettings


def compute_targets(model: ServedModel, payloads: Sequence[TargetsPayload]) -> list[StyleTargets]:
    """Each job's Gram and content targets, on the model's device."""
    space = PixelSpace(model.preprocess.mean, model.preprocess.std)
    return [make_targets(model.module, space, p.content.to(model.device), p.style.to(model.device), p.settings)
            for p in payloads]
