"""Candidate extraction: one batch of a layer's activations reduced to what the top-k index keeps of it.

Per image and channel: the spatial max and its first position, the mean, the strongest local peaks (for
the "regions" ranking) and the count of positive positions. The index (index.py) folds candidates in;
the server's scheduler hands each task its own rows (`select`) and joins them back (`concat`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_PER_IMAGE = 4  # regions kept per image and channel


@dataclass
class Candidates:
    """One batch's contribution, before it is merged: per image and channel (see `candidates`)."""

    max_value: np.ndarray  # [B, C] float32
    max_pos: np.ndarray  # [B, C] int64, flat position of the first spatial max
    mean_value: np.ndarray  # [B, C] float32
    region_value: np.ndarray  # [B, C, P] float32 (-inf where an image has fewer peaks)
    region_pos: np.ndarray  # [B, C, P] int64
    positive: np.ndarray  # [B, C] int64, positions > 0
    positions: int  # positions per image and channel (H * W)


def as_map(acts: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] as is; a vector layer's [B, N] as [B, N, 1, 1]."""
    if acts.ndim == 2:
        return acts[:, :, None, None]
    if acts.ndim != 4:
        raise ValueError(f"expected a [B, C, H, W] map or a [B, N] vector, got {tuple(acts.shape)}")
    return acts


@torch.no_grad()
def candidates(acts: torch.Tensor, per_image: int = DEFAULT_PER_IMAGE) -> Candidates:
    """Per image and channel: the spatial max and its first position, the mean, the top local peaks."""
    a = as_map(acts).float()
    a = torch.nan_to_num(a, nan=-torch.inf)  # a NaN never ranks
    b, c, h, w = a.shape
    flat = a.reshape(b, c, h * w)
    max_value, max_pos = flat.max(dim=2)  # ties: torch returns the first maximal index
    # Exact first index on ties, whatever the backend: the smallest position holding the max.
    positions = torch.arange(h * w, device=a.device).expand_as(flat)
    max_pos = torch.where(flat == max_value[..., None], positions, h * w).amin(dim=2)
    mean_value = flat.mean(dim=2)
    peaks = a == F.max_pool2d(a, 3, stride=1, padding=1) if h * w > 1 else torch.ones_like(a, dtype=torch.bool)
    masked = torch.where(peaks, a, -torch.inf).reshape(b, c, h * w)
    region_value = torch.full((b, c, per_image), -torch.inf, device=a.device)
    region_pos = torch.zeros((b, c, per_image), dtype=torch.long, device=a.device)
    for p in range(min(per_image, h * w)):
        v, _ = masked.max(dim=2)
        i = torch.where(masked == v[..., None], positions, h * w).amin(dim=2).clamp_max(h * w - 1)
        region_value[..., p] = v
        region_pos[..., p] = i
        masked.scatter_(2, i[..., None], -torch.inf)
    positive = (flat > 0).sum(dim=2)
    return Candidates(max_value.cpu().numpy(), max_pos.cpu().numpy(), mean_value.cpu().numpy(),
                      region_value.cpu().numpy(), region_pos.cpu().numpy(), positive.cpu().numpy(), h * w)


def select(batch: Candidates, rows: Sequence[int]) -> Candidates:
    """Some images of a batch (the scheduler hands each task its own row)."""
    r = list(rows)
    return Candidates(batch.max_value[r], batch.max_pos[r], batch.mean_value[r], batch.region_value[r],
                      batch.region_pos[r], batch.positive[r], batch.positions)


def concat(parts: Sequence[Candidates]) -> Candidates:
    return Candidates(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                        ("max_value", "max_pos", "mean_value", "region_value", "region_pos", "positive")),
                      positions=parts[0].positions)
