"""Compute stopped once nobody waits for it (issue #15): a batch whose callers have all gone stops at its next
chunk and frees its lane; a batch with a caller still waiting computes on, and that caller gets its result.

The computes here are the engine's integrated gradients on a tiny network, held at a gate until the test has
cancelled its callers, so what the worker sees is decided by the test, not by timing."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

from convlens.server.engine.integrated_gradients import integrated_gradients
from convlens.server.engine.targets import ClassTarget
from convlens.server.metrics import Metrics
from convlens.server.scheduler.memory import TRIM_AFTER_S, resident_bytes, stop_condition, trim_memory

from .helpers import Recorder, task, wait_until


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3)).eval()


class GatedIG:
    """Integrated gradients of one 8x8 image per payload (payload = its seed), `steps` rows each in chunks of
    `chunk`; the compute waits at `gate` after signalling `started`."""

    def __init__(self, steps: int, chunk: int = 4) -> None:
        self.net = tiny_net()
        self.steps, self.chunk = steps, chunk
        self.started = threading.Event()
        self.gate = threading.Event()

    @staticmethod
    def image(seed: int) -> torch.Tensor:
        return torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(seed))

    def alone(self, seed: int) -> torch.Tensor:
        x = self.image(seed)
        return integrated_gradients(self.net, x, [ClassTarget(1)], torch.zeros_like(x), self.steps,
                                    chunk=self.chunk)[0]

    def __call__(self, replica: Any, payloads: Sequence[int]) -> list[torch.Tensor]:
        self.started.set()
        assert self.gate.wait(30), "test gate never opened"
        x = torch.cat([self.image(p) for p in payloads])
        out = integrated_gradients(self.net, x, [ClassTarget(1)] * len(payloads), torch.zeros_like(x), self.steps,
                                   chunk=self.chunk)
        return list(out)


def stopped(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("convlens_compute_stopped_total", {"model": "m", "rpc": "Saliency"}) or 0


async def cancel(call: asyncio.Future[Any]) -> None:
    """Cancel a caller and wait until the scheduler has seen it go (its except-clause has run)."""
    call.cancel()
    await asyncio.gather(call, return_exceptions=True)


async def test_a_batch_nobody_waits_for_stops_and_frees_its_lane(make_scheduler, metrics) -> None:
    s = await make_scheduler(max_batch_size=1)
    ig = GatedIG(steps=1024, chunk=1)  # 1,024 chunks; it stops at the first
    first = asyncio.ensure_future(s.submit(task(0, ig)))
    await asyncio.to_thread(ig.started.wait, 30)
    await cancel(first)
    ig.gate.set()
    quick = Recorder()
    assert await s.submit(task(7, quick, key="other")) == 70  # the lane was freed
    assert stopped(metrics) == 1


async def test_a_companion_still_waiting_keeps_the_batch_going_and_gets_its_own_result(
        make_scheduler, metrics) -> None:
    s = await make_scheduler(max_batch_size=2, max_batch_delay=30.0)  # ready when both are queued
    ig = GatedIG(steps=40)
    gone = asyncio.ensure_future(s.submit(task(1, ig)))
    kept = asyncio.ensure_future(s.submit(task(2, ig)))
    await asyncio.to_thread(ig.started.wait, 30)
    await cancel(gone)
    ig.gate.set()
    result = await kept
    torch.testing.assert_close(result, ig.alone(2), rtol=1e-5, atol=1e-6)  # the same as computed alone
    assert stopped(metrics) == 0


@dataclass
class FakeTask:
    deadline: float | None


@dataclass
class FakeEntry:
    task: FakeTask
    cancelled: bool = False


def test_the_stop_condition_waits_for_every_caller_of_the_batch() -> None:
    now = [10.0]
    entries = [FakeEntry(FakeTask(deadline=12.0)), FakeEntry(FakeTask(deadline=None)), FakeEntry(FakeTask(11.0))]
    gone = stop_condition(entries, clock=lambda: now[0])
    assert not gone()
    entries[1].cancelled = True  # no deadline, but its caller left
    assert not gone()  # entry 0 and 2 are still within their deadlines
    now[0] = 11.5
    assert not gone()  # entry 0 still waits
    now[0] = 12.0
    assert gone()


def test_trim_gives_freed_heap_memory_back() -> None:
    if trim_memory() is None:
        pytest.skip("no glibc malloc_trim here")
    # 256 MB of 64 KB blocks (under glibc's mmap threshold: on the heap); free every other one, so the heap
    # cannot shrink from its top and the freed half stays resident until trimmed.
    blocks = [bytearray(b"\x01" * 65536) for _ in range(4096)]
    del blocks[::2]
    before = resident_bytes()
    freed = trim_memory()
    after = resident_bytes()
    assert before is not None and after is not None and freed is not None
    assert freed > 64 * 2**20, (freed, before, after)  # at least half of the 128 MB freed came back
    assert len(blocks) == 2048


async def test_after_a_long_batch_the_idle_worker_gives_memory_back(make_scheduler, metrics) -> None:
    if trim_memory() is None:
        pytest.skip("no glibc malloc_trim here")
    s = await make_scheduler(max_batch_size=1)
    quick = Recorder()
    assert await s.submit(task(1, quick)) == 10

    def trims() -> float:
        return metrics.registry.get_sample_value("convlens_memory_trims_total") or 0

    assert trims() == 0  # a short batch leaves nothing to trim
    assert await s.submit(task(2, Recorder(delay=TRIM_AFTER_S + 0.1))) == 20  # a long one
    await wait_until(lambda: trims() == 1, timeout=60)  # trimmed once the worker was idle
