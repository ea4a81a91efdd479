"""stop(grace): refuse new work, finish accepted work within grace, fail what is left."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from convlens.server.errors import Unavailable
from convlens.server.scheduler import Scheduler

from .helpers import Recorder, task, wait_until


async def test_stop_finishes_accepted_work_and_refuses_new(make_scheduler, gate, metrics) -> None:
    s = await make_scheduler(max_batch_size=1, max_batch_delay=0.0)
    rec = Recorder(gate=gate)
    inflight = asyncio.ensure_future(s.submit(task(1, rec)))
    await wait_until(rec.started.is_set)
    queued = asyncio.ensure_future(s.submit(task(2, rec)))
    await wait_until(lambda: s.queue_depth() == 1)
    stopping = asyncio.ensure_future(s.stop(5.0))
    await asyncio.sleep(0.01)
    with pytest.raises(Unavailable, match="shutting down"):
        await s.submit(task(3, rec))
    assert not stopping.done()
    gate.set()
    await asyncio.wait_for(stopping, 5)
    assert await inflight == 10 and await queued == 20
    assert 3 not in rec.payloads
    assert metrics.registry.get_sample_value(
        "convlens_scheduler_rejections_total", {"model": "m", "rpc": "Saliency", "reason": "stopping"}) == 1
    with pytest.raises(Unavailable):
        await s.submit(task(4, rec))
    await s.stop(1.0)  # a second stop is harmless


async def test_stop_flushes_groups_waiting_for_companions(make_scheduler) -> None:
    s = await make_scheduler(max_batch_size=8, max_batch_delay=30.0)
    rec = Recorder()
    pending = asyncio.ensure_future(s.submit(task(1, rec)))
    await wait_until(lambda: s.queue_depth() == 1)
    t0 = time.monotonic()
    await s.stop(5.0)
    assert time.monotonic() - t0 < 2.0
    assert await pending == 10


async def test_stop_after_grace_fails_what_is_left(make_scheduler, gate) -> None:
    s = await make_scheduler(max_batch_size=1, max_batch_delay=0.0)
    rec = Recorder(gate=gate)
    inflight = asyncio.ensure_future(s.submit(task(1, rec)))
    await wait_until(rec.started.is_set)
    queued = asyncio.ensure_future(s.submit(task(2, rec)))
    await wait_until(lambda: s.queue_depth() == 1)
    t0 = time.monotonic()
    await s.stop(0.1)
    assert time.monotonic() - t0 < 2.0
    with pytest.raises(Unavailable, match="before this task finished"):
        await inflight
    with pytest.raises(Unavailable, match="before this task started"):
        await queued
    gate.set()  # the stuck compute finishes; its result is dropped and its thread exits
    assert 2 not in rec.payloads


async def test_submit_before_start_is_unavailable(metrics) -> None:
    s = Scheduler(lambda n: None, [torch.device("cpu")], metrics)
    with pytest.raises(Unavailable, match="not started"):
        await s.submit(task(1, Recorder()))
    await s.stop(0.1)


async def test_a_worker_closes_even_when_the_queue_changes_in_the_same_moment(make_scheduler) -> None:
    """The dispatcher waits for companions with a timeout. On Python 3.11 asyncio.wait_for swallowed a
    cancellation that arrived just as its event was set (gh-86296): the dispatcher looped on and close() waited
    for it forever. Here the event is set and the dispatcher cancelled in the same moment."""
    s = await make_scheduler(max_batch_size=8, max_batch_delay=30.0)
    rec = Recorder()
    pending = asyncio.ensure_future(s.submit(task(1, rec)))
    await wait_until(lambda: s.queue_depth() == 1)
    await asyncio.sleep(0.01)  # the dispatcher is in its timed wait for companions
    worker = s._workers[0]
    assert worker._changed is not None
    worker._changed.set()
    await asyncio.sleep(0)  # the event's waiter has finished; the dispatcher has not run yet
    await asyncio.wait_for(worker.close(lambda: Unavailable("closed")), 3.0)
    assert worker._dispatcher is not None and worker._dispatcher.done()
    pending.cancel()
