"""The physical limit: in-process torch throughput of forward + backward to the input, by memory layout and
batch size, so that the service is compared with the best configuration this machine offers."""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


@dataclass(frozen=True)
class RawPoint:
    layout: str  # a key of LAYOUTS
    batch_size: int
    images_per_second: float


def gradient_step(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What Saliency(method=gradient) computes: d top-1 logit / d pixels for every image of a batch."""
    x = x.detach().requires_grad_(True)
    logits = model(x)
    top = logits.argmax(dim=1, keepdim=True)
    (grad,) = torch.autograd.grad(logits.gather(1, top).sum(), x)
    return grad


def in_layouts(model: nn.Module, layouts: Sequence[str]) -> dict[str, nn.Module]:
    """One copy of `model` per layout (weights converted as a worker converts its replica)."""
    return {name: copy.deepcopy(model).to(memory_format=LAYOUTS[name]).eval() for name in layouts}


def measure_one(model: nn.Module, layout: str, batch: int, size: int, seconds: float,
                device: torch.device) -> RawPoint:
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=LAYOUTS[layout])
    gradient_step(model, x)  # warm-up (allocations, kernels)
    n, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        gradient_step(model, x)
        n += batch
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return RawPoint(layout, batch, n / (time.perf_counter() - started))


def measure(models: dict[str, nn.Module], size: int, batch_sizes: Sequence[int], seconds: float,
            device: torch.device) -> list[RawPoint]:
    """Every (layout, batch size), the layouts interleaved per batch size so that drift hits both alike."""
    return [measure_one(model, layout, b, size, seconds, device)
            for b in batch_sizes for layout, model in models.items()]
