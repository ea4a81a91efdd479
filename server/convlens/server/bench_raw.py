"""The physical limit: in-process torch throughput of forward + backward to the input, by batch size."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class RawPoint:
    batch_size: int
    images_per_second: float


def gradient_step(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What Saliency(method=gradient) computes: d top-1 logit / d pixels for every image of a batch."""
    x = x.detach().requires_grad_(True)
    logits = model(x)
    top = logits.argmax(dim=1, keepdim=True)
    (grad,) = torch.autograd.grad(logits.gather(1, top).sum(), x)
    return grad


def measure(model: nn.Module, size: int, batch_sizes: tuple[int, ...], seconds: float,
            device: torch.device) -> list[RawPoint]:
    points = []
    for b in batch_sizes:
        x = torch.randn(b, 3, size, size, device=device)
        gradient_step(model, x)  # warm-up (allocations, kernels)
        n, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            gradient_step(model, x)
            n += b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        points.append(RawPoint(b, n / (time.perf_counter() - started)))
    return points
