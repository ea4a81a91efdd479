"""Dream's one-shot work on the job's device: the guide's features, and the scores of the final image."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from convlens.server.engine.layer_features import PixelSpace
from convlens.server.engine.optimize.dream import LayerObjective, guide_features, layer_objective
from convlens.server.models.model import ServedModel


def pixel_space(model: ServedModel) -> PixelSpace:
    return PixelSpace(model.preprocess.mean, model.preprocess.std)


@dataclass(frozen=True)
class GuidePayload:
    guide: torch.Tensor  # [3, H, W], 0..255, cpu
    layer: str
    longest_side: int


def compute_guides(model: ServedModel, payloads: Sequence[GuidePayload]) -> list[torch.Tensor]:
    """Each guide's features [C, h, w] at its layer, on the model's device."""
    space = pixel_space(model)
    return [guide_features(model.module, space, p.guide.to(model.device), p.layer, p.longest_side)
            for p in payloads]


@dataclass(frozen=True)
class ScorePayload:
    before: torch.Tensor  # [3, H, W] 0..255: the input at the dreamed size
    after: torch.Tensor  # the dreamed image
    layer: str
    objective: LayerObjective


def compute_scores(model: ServedModel, payloads: Sequence[ScorePayload]) -> list[tuple[float, float]]:
    """(objective on the input, objective on the dream), each by a plain forward pass without jitter."""
    space = pixel_space(model)
    return [(layer_objective(model.module, space, p.before.to(model.device), p.layer, p.objective),
             layer_objective(model.module, space, p.after.to(model.device), p.layer, p.objective))
            for p in payloads]
