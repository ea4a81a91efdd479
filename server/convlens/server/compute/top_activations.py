"""The index scan as a scheduler batch: stack the images, forward to the layer, one candidate row each."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from convlens.server.engine.topk.candidates import Candidates, select
from convlens.server.engine.topk.scan import scan_candidates
from convlens.server.models.model import ServedModel


@dataclass(frozen=True, eq=False)
class ScanPayload:
    layer: str
    image: torch.Tensor  # normalised [3, H, W], cpu
    per_image: int

    @property
    def batch_key(self) -> Hashable:
        return ("scan", self.layer, tuple(self.image.shape), self.per_image)


def compute_scan(model: ServedModel, payloads: Sequence[ScanPayload]) -> list[Candidates]:
    """One batch of one index scan (every payload shares `batch_key`)."""
    first = payloads[0]
    inputs = torch.stack([p.image for p in payloads]).to(model.device)
    channels_last = getattr(model, "memory_format", None) == torch.channels_last
    batch = scan_candidates(model.module, first.layer, inputs, per_image=first.per_image,
                            channels_last=channels_last)
    return [select(batch, [i]) for i in range(len(payloads))]
