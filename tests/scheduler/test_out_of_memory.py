"""Out of memory inside a batch (issue #15): the batch is split and retried; only a task that is out of memory
alone gets RESOURCE_EXHAUSTED, its companions their results, and the worker goes on. Faults are injected by the
compute itself and by the test-only CONVLENS_TEST_FAULTS hook."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
import torch

from convlens.server.errors import ResourceExhausted
from convlens.server.scheduler.memory import FAULTS_ENV, compute_splitting, injected_faults, with_faults

from .helpers import task, wait_until


class Hungry:
    """A compute that is out of memory for batches over `fits` payloads, and for payload `huge` even alone."""

    def __init__(self, fits: int, huge: int | None = None) -> None:
        self.fits, self.huge = fits, huge
        self.attempts: list[list[int]] = []

    def __call__(self, replica: Any, payloads: Sequence[int]) -> list[int]:
        self.attempts.append(list(payloads))
        if len(payloads) > self.fits or self.huge in payloads:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return [p * 10 for p in payloads]


def test_split_in_halves_until_each_part_fits() -> None:
    hungry = Hungry(fits=2, huge=5)
    results = compute_splitting(hungry, None, [1, 2, 3, 4, 5, 6, 7, 8], "Saliency request")
    assert results[:4] == [10, 20, 30, 40] and results[5:] == [60, 70, 80]
    assert isinstance(results[4], ResourceExhausted) and "out of memory" in results[4].message
    assert hungry.attempts[0] == [1, 2, 3, 4, 5, 6, 7, 8] and [5] in hungry.attempts


async def test_only_the_task_that_fails_alone_gets_resource_exhausted(make_scheduler, gate) -> None:
    s = await make_scheduler(max_batch_size=8, max_batch_delay=0.5)
    hungry = Hungry(fits=2, huge=3)
    calls = [asyncio.ensure_future(s.submit(task(i, hungry))) for i in range(8)]
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    assert [o for i, o in enumerate(outcomes) if i != 3] == [0, 10, 20, 40, 50, 60, 70]
    assert isinstance(outcomes[3], ResourceExhausted)
    assert max(len(a) for a in hungry.attempts) > 2  # it was batched, then split
    assert await s.submit(task(9, hungry)) == 90  # the worker goes on


def test_the_fault_hook_is_off_unless_a_test_sets_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FAULTS_ENV, raising=False)
    assert injected_faults() == {}
    compute = Hungry(fits=100)
    assert with_faults(compute, injected_faults()) is compute
    monkeypatch.setenv(FAULTS_ENV, "oom_batch_over=2")
    faulty = with_faults(compute, injected_faults())
    assert faulty(None, [1, 2]) == [10, 20]
    with pytest.raises(torch.OutOfMemoryError, match="injected"):
        faulty(None, [1, 2, 3])


async def test_injected_oom_through_the_scheduler_splits_every_large_batch(make_scheduler, monkeypatch) -> None:
    monkeypatch.setenv(FAULTS_ENV, "oom_batch_over=1")
    s = await make_scheduler(max_batch_size=4, max_batch_delay=0.5)
    compute = Hungry(fits=100)
    outcomes = await asyncio.gather(*(s.submit(task(i, compute)) for i in range(4)))
    assert outcomes == [0, 10, 20, 30]
    await wait_until(lambda: s.queue_depth() == 0)
    assert all(len(a) == 1 for a in compute.attempts)  # larger batches never reached the compute
