"""Overload, deadlines and cancellation: refused or dropped before compute, companions unaffected."""

from __future__ import annotations

import asyncio
import time

import pytest

from convlens.server.errors import DeadlineExceeded, ResourceExhausted

from .helpers import Recorder, task, wait_until


async def test_queue_full_is_refused_at_once_and_nothing_accepted_is_lost(make_scheduler, gate,
                                                                         metrics) -> None:
    s = await make_scheduler(max_batch_size=2, max_batch_delay=0.0, max_queue=3)
    rec = Recorder(gate=gate)
    busy = asyncio.ensure_future(s.submit(task(0, rec)))  # taken by the worker, blocked on the gate
    await wait_until(rec.started.is_set)
    queued = [asyncio.ensure_future(s.submit(task(i, rec))) for i in (1, 2, 3)]
    await wait_until(lambda: s.queue_depth() == 3)

    t0 = time.monotonic()
    with pytest.raises(ResourceExhausted, match=r"3 tasks queued \(max_queue=3\); retry with backoff"):
        await asyncio.wait_for(s.submit(task(4, rec)), 1.0)
    assert time.monotonic() - t0 < 0.5  # refused at once, not after a wait
    assert metrics.registry.get_sample_value(
        "convlens_scheduler_rejections_total", {"model": "m", "rpc": "Saliency", "reason": "queue_full"}) == 1

    gate.set()
    assert await asyncio.gather(busy, *queued) == [0, 10, 20, 30]  # every accepted task completes
    assert await s.submit(task(5, rec)) == 50  # and the scheduler serves again


async def test_deadline_passed_before_compute_drops_only_that_task(make_scheduler, gate, metrics) -> None:
    s = await make_scheduler(max_batch_size=8, max_batch_delay=0.0)
    rec = Recorder(gate=gate)
    blocker = asyncio.ensure_future(s.submit(task(0, rec, key="block")))
    await wait_until(rec.started.is_set)
    late = asyncio.ensure_future(s.submit(task(1, rec, deadline=time.monotonic() + 0.05)))
    fine = asyncio.ensure_future(s.submit(task(2, rec, deadline=time.monotonic() + 30)))
    free = asyncio.ensure_future(s.submit(task(3, rec)))
    await asyncio.sleep(0.1)  # `late` expires while the worker is busy...
    assert late.done()  # ...and is failed at its deadline, not when the worker frees up
    gate.set()
    with pytest.raises(DeadlineExceeded, match="deadline passed while the task was queued"):
        await late
    assert await asyncio.gather(blocker, fine, free) == [0, 20, 30]
    assert rec.batches[1] == ("m", [2, 3])  # never computed; its companions were
    assert metrics.registry.get_sample_value(
        "convlens_scheduler_rejections_total", {"model": "m", "rpc": "Saliency", "reason": "deadline"}) == 1


async def test_deadline_already_passed_at_submit(make_scheduler) -> None:
    s = await make_scheduler()
    rec = Recorder()
    with pytest.raises(DeadlineExceeded):
        await s.submit(task(1, rec, deadline=time.monotonic() - 1))
    assert rec.batches == []


async def test_cancelled_while_queued_is_never_computed(make_scheduler, gate, metrics) -> None:
    s = await make_scheduler(max_batch_size=3, max_batch_delay=0.0)
    rec = Recorder(gate=gate)
    blocker = asyncio.ensure_future(s.submit(task(0, rec, key="block")))
    await wait_until(rec.started.is_set)
    a, b, c = (asyncio.ensure_future(s.submit(task(i, rec))) for i in (1, 2, 3))
    await wait_until(lambda: s.queue_depth() == 3)
    b.cancel()  # what grpc.aio does to the handler when the client cancels
    with pytest.raises(asyncio.CancelledError):
        await b
    assert s.queue_depth() == 2  # removed at once: it no longer counts toward the batch
    gate.set()
    assert await asyncio.gather(blocker, a, c) == [0, 10, 30]
    assert rec.batches[1:] == [("m", [1, 3])]
    assert 2 not in rec.payloads
    assert metrics.registry.get_sample_value(
        "convlens_scheduler_rejections_total", {"model": "m", "rpc": "Saliency", "reason": "cancelled"}) == 1


async def test_a_call_cancelled_at_its_deadline_counts_as_a_deadline_drop(make_scheduler, gate, metrics) -> None:
    """grpc cancels a call at its deadline; on a busy loop that can come before the scheduler's own expiry
    timer for the same task. The drop is then still counted as "deadline", not as a caller who left."""
    s = await make_scheduler(max_batch_size=3, max_batch_delay=0.0)
    rec = Recorder(gate=gate)
    blocker = asyncio.ensure_future(s.submit(task(0, rec, key="block")))
    await wait_until(rec.started.is_set)
    late = asyncio.ensure_future(s.submit(task(1, rec, deadline=time.monotonic() + 0.05)))
    left = asyncio.ensure_future(s.submit(task(2, rec, deadline=time.monotonic() + 30)))
    await wait_until(lambda: s.queue_depth() == 2)
    time.sleep(0.1)  # the loop is stalled past `late`'s deadline...
    late.cancel()  # ...and grpc's cancellation runs before the expiry timer gets its turn
    left.cancel()  # a caller leaving well before its deadline
    for gone in (late, left):
        with pytest.raises(asyncio.CancelledError):
            await gone
    gate.set()
    assert await blocker == 0
    assert rec.payloads == [0]
    count = metrics.registry.get_sample_value
    labels = {"model": "m", "rpc": "Saliency"}
    assert count("convlens_scheduler_rejections_total", {**labels, "reason": "deadline"}) == 1
    assert count("convlens_scheduler_rejections_total", {**labels, "reason": "cancelled"}) == 1


async def test_cancelled_full_group_does_not_block_companions(make_scheduler, gate) -> None:
    # Cancelling one of a group that would otherwise be full: the rest still go after the delay.
    s = await make_scheduler(max_batch_size=2, max_batch_delay=0.05)
    rec = Recorder()
    a = asyncio.ensure_future(s.submit(task(1, rec)))
    a.cancel()
    with pytest.raises(asyncio.CancelledError):
        await a
    assert await asyncio.wait_for(s.submit(task(2, rec)), 5) == 20
    assert rec.batches == [("m", [2])]


async def test_cancelled_while_computing_propagates_and_worker_goes_on(make_scheduler, gate) -> None:
    s = await make_scheduler(max_batch_size=2, max_batch_delay=0.0)
    rec = Recorder(gate=gate)
    a, b = (asyncio.ensure_future(s.submit(task(i, rec))) for i in (1, 2))
    await wait_until(rec.started.is_set)
    a.cancel()
    with pytest.raises(asyncio.CancelledError):
        await a
    gate.set()
    assert await b == 20  # its companion gets its result
    assert await s.submit(task(3, rec)) == 30
