"""Raw torch's CPU per image: the peers' gradient step in process, no serving, with the process's CPU time.

Configurations (channels_last, EfficientNet-Lite0 forward + backward to the input): one thread with every
intra-op thread at batch 4, and two single-threaded shards side by side at batch 2 and at batch 4 (what
`convlens serve` runs, scheduler/shards.py). Each reports images/s and CPU-ms per image (process rusage
over the loop: OpenMP's spinning counts, as it does in a server).
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass

import torch

from convlens.server.models.model import ServedModel
from convlens.server.scheduler.shards import side_by_side

CONFIGS = (("one thread, 2 intra-op, batch 4", 1, 4), ("2 shards x 1 thread, batch 2", 2, 2),
           ("2 shards x 1 thread, batch 4", 2, 4))


@dataclass(frozen=True)
class RawPoint:
    config: str
    images_per_second: float
    cpu_ms_per_image: float


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _loop(model: ServedModel, batch: int, seconds: float, size: int) -> int:
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)

    def step() -> None:
        xi = x.detach().requires_grad_(True)
        logits = model.module(xi)
        top = logits.detach().argmax(dim=1, keepdim=True)
        torch.autograd.grad(logits.gather(1, top).sum(), xi)

    step()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        n += batch
    return n


def measure(model: ServedModel, seconds: float, cores: int = 2) -> list[RawPoint]:
    size = model.preprocess.height
    points = []
    for label, shards, batch in CONFIGS:
        copies = [model.replica(torch.device("cpu"), fresh=True) for _ in range(shards)]
        cpu0, t0 = _cpu(), time.perf_counter()
        counts = side_by_side([lambda m=m, b=batch: _loop(m, b, seconds, size) for m in copies], cores // shards)
        cpu1, t1 = _cpu(), time.perf_counter()
        images = sum(counts)
        points.append(RawPoint(label, images / (t1 - t0), 1e3 * (cpu1 - cpu0) / images))
    return points
