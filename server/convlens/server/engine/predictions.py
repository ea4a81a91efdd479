"""Top-k predictions from logits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Prediction:
    class_index: int
    label: str
    logit: float
    probability: float


def top_k(logits: torch.Tensor, labels: Sequence[str], k: int = 5) -> list[Prediction]:
    """The k highest logits of one sample [K], with softmax probabilities."""
    logits = logits.detach().float().cpu().flatten()
    probs = torch.softmax(logits, dim=0)
    values, indices = torch.topk(probs, min(k, logits.numel()))
    return [
        Prediction(
            class_index=int(i),
            label=labels[int(i)] if int(i) < len(labels) else f"class_{int(i)}",
            logit=float(logits[int(i)]),
            probability=float(p),
        )
        for p, i in zip(values.tolist(), indices.tolist(), strict=True)
    ]
