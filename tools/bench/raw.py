"""The physical limit: in-process torch throughput of forward + backward to the input, by memory layout,
batch size and threading, so that the service is compared with the best configuration this machine offers.

"main": one loop on this thread with every intra-op thread (the only OpenMP team of the process: a second
team makes GNU OpenMP stop spinning, see scheduler/shards.py; an earlier "worker thread" column measured
after the main thread's team existed ran 0.6x at batch 1 for that reason alone, not for being a thread).
"shards" runs the server's CPU shards' configuration without the server: that many threads, each with its
share of the intra-op threads and a model of its own, each looping over batches of `batch_size` on its own
(no barrier between them); images/s is their sum (scheduler/shards.py says why this can beat one team).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from convlens.server.scheduler.shards import side_by_side, threads_per_shard

LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


CONTEXTS = ("main", "shards")  # one loop on this thread, or loops on parallel single-threaded shards


@dataclass(frozen=True)
class RawPoint:
    layout: str  # a key of LAYOUTS
    batch_size: int
    images_per_second: float
    context: str = "main"  # a CONTEXTS value
    shards: int = 1  # for context "shards": how many ran side by side, each at batch_size

    @property
    def label(self) -> str:
        if self.context == "shards":
            return f"{self.layout}, batch {self.batch_size} on each of {self.shards} shards"
        return f"{self.layout}, batch {self.batch_size}, one thread with {torch.get_num_threads()} intra-op"


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
                device: torch.device, context: str = "main", shards: int = 2) -> RawPoint:
    if context == "shards":
        return _measure_shards(model, layout, batch, size, seconds, device, shards)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=LAYOUTS[layout])
    gradient_step(model, x)  # warm-up (allocations, kernels)
    n, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        gradient_step(model, x)
        n += batch
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return RawPoint(layout, batch, n / (time.perf_counter() - started))


def _measure_shards(model: nn.Module, layout: str, batch: int, size: int, seconds: float, device: torch.device,
                    shards: int) -> RawPoint:
    copies = [model, *(copy.deepcopy(model) for _ in range(shards - 1))]
    rates = side_by_side([lambda m=m: measure_one(m, layout, batch, size, seconds, device).images_per_second
                          for m in copies], threads_per_shard(shards))
    return RawPoint(layout, batch, sum(rates), "shards", shards)


def measure(models: dict[str, nn.Module], size: int, batch_sizes: Sequence[int], seconds: float,
            device: torch.device, contexts: Sequence[str] = CONTEXTS, shards: int = 2) -> list[RawPoint]:
    """Every (layout, batch size, context), interleaved per batch size so that drift hits all alike.
    Shards are a CPU configuration: skipped on other devices or with one shard."""
    if device.type != "cpu" or shards < 2:
        contexts = [c for c in contexts if c != "shards"]
    return [measure_one(model, layout, b, size, seconds, device, context, shards)
            for b in batch_sizes for layout, model in models.items() for context in contexts]
