"""Deadline-aware admission (issue #15): a task whose deadline the queue ahead cannot meet is refused at once
with RESOURCE_EXHAUSTED and a retry hint, instead of waiting its deadline out."""

from __future__ import annotations

import asyncio
import time

import pytest

from convlens.server.errors import DeadlineExceeded, ResourceExhausted
from convlens.server.scheduler.admission import ServiceTimes, estimated_wait

from .helpers import Recorder, task, wait_until


def test_estimated_wait_batches_the_queue_per_lane_and_ignores_unmeasured_work() -> None:
    times = ServiceTimes()
    times.record("m", "Saliency", 0.2)
    times.record("m", "Saliency", 0.4)  # moving average: 0.7 * 0.2 + 0.3 * 0.4
    assert times.per_batch("m", "Saliency") == pytest.approx(0.26)
    queued = [("m", "Saliency", 5), ("m", "GetFilters", 100)]  # GetFilters never measured: counts nothing
    assert estimated_wait(queued, times, batch=2, lanes=1) == pytest.approx(3 * 0.26)
    assert estimated_wait(queued, times, batch=2, lanes=3) == pytest.approx(0.26)


async def test_a_deadline_the_queue_cannot_meet_is_refused_at_once(make_scheduler, gate, metrics) -> None:
    s = await make_scheduler(max_batch_size=1, max_batch_delay=0.0)
    measured = Recorder(delay=0.2)
    assert await s.submit(task(1, measured)) == 10  # the server learns: ~0.2 s per Saliency batch
    blocked = Recorder(gate=gate)
    blocker = asyncio.ensure_future(s.submit(task(2, blocked)))
    await wait_until(blocked.started.is_set)
    queued = [asyncio.ensure_future(s.submit(task(10 + i, measured))) for i in range(6)]
    await wait_until(lambda: s.queue_depth() == 6)

    t0 = time.monotonic()
    with pytest.raises(ResourceExhausted, match=r"server busy: 6 tasks queued.*retry") as info:
        await s.submit(task(99, measured, deadline=time.monotonic() + 0.5))
    assert time.monotonic() - t0 < 0.5  # refused before its deadline, not at it
    assert "past its deadline" in info.value.message
    patient = asyncio.ensure_future(s.submit(task(100, measured, deadline=time.monotonic() + 60)))
    await asyncio.sleep(0)
    assert s.queue_depth() == 7  # a deadline the queue can meet is admitted

    gate.set()
    assert await asyncio.gather(blocker, *queued, patient) == [20, *(100 + 10 * i for i in range(6)), 1000]
    assert metrics.registry.get_sample_value("convlens_scheduler_rejections_total", {
        "model": "m", "rpc": "Saliency", "reason": "deadline_unmeetable"}) == 1


async def test_an_idle_server_still_tries_a_tight_deadline(make_scheduler) -> None:
    """No queue to blame: the call is not refused by the estimate (it may still miss its deadline)."""
    s = await make_scheduler(max_batch_size=1, max_batch_delay=0.0)
    slow = Recorder(delay=0.2)
    assert await s.submit(task(1, slow)) == 10
    assert await s.submit(task(2, slow, deadline=time.monotonic() + 0.1)) == 20  # computed once started
    with pytest.raises(DeadlineExceeded):
        await s.submit(task(3, slow, deadline=time.monotonic() - 1))
