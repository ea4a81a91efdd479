"""GetFilters as a batch computation: read a layer's weights (and render them) on a worker."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from convlens.server.engine.filters import FilterWeights, conv_filters
from convlens.server.engine.render import filter_grid
from convlens.server.models.model import ServedModel


@dataclass(frozen=True)
class FiltersPayload:
    """What one GetFilters computes: a layer's weights and, when asked, their grid picture."""

    layer: str
    render_grid: bool = False
    scaling: str = "minmax"  # "minmax" | "symmetric"
    max_filters: int = 64
    max_input_channels: int = 16
    cell_scale: int | None = None


FiltersResult = tuple[FilterWeights, Image.Image | None]  # the weights and, when asked, their grid


def compute_filters(model: ServedModel, queries: Sequence[FiltersPayload]) -> list[FiltersResult | Exception]:
    pre = model.preprocess
    example = torch.zeros(3, pre.height, pre.width, device=model.device)
    answers: list[FiltersResult | Exception] = []
    for q in queries:
        try:
            f = conv_filters(model.resolver, q.layer, example if model.format != "onnx" else None)
            grid = (
                filter_grid(f.weights, scaling=q.scaling, max_filters=q.max_filters,
                            max_input_channels=q.max_input_channels, cell_scale=q.cell_scale,
                            dead=f.dead_channels)
                if q.render_grid else None
            )
            answers.append((f, grid))
        except Exception as exc:  # one bad query must not fail its batch companions
            answers.append(exc)
    return answers
