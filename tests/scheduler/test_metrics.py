"""Scheduler metrics move as tasks are queued, batched, computed and refused."""

from __future__ import annotations

import asyncio

from .helpers import Recorder, task, wait_until


async def test_metrics_values_move(make_scheduler, gate, metrics) -> None:
    get = metrics.registry.get_sample_value
    s = await make_scheduler(max_batch_size=4, max_batch_delay=0.0)
    rec = Recorder(gate=gate, delay=0.02)
    first = asyncio.ensure_future(s.submit(task(0, rec)))
    await wait_until(rec.started.is_set)
    rest = [asyncio.ensure_future(s.submit(task(i, rec))) for i in range(1, 5)]
    await wait_until(lambda: s.queue_depth() == 4)
    assert get("convlens_scheduler_queue_depth", {"device": "all"}) == 4
    gate.set()
    await asyncio.gather(first, *rest)

    per_batch = {"device": "cpu", "model": "m", "rpc": "Saliency"}
    assert get("convlens_scheduler_queue_depth", {"device": "all"}) == 0
    assert get("convlens_scheduler_batch_size_count", per_batch) == 2
    assert get("convlens_scheduler_batch_size_sum", per_batch) == 5
    assert get("convlens_scheduler_tasks_total", per_batch) == 5
    assert get("convlens_scheduler_compute_seconds_count", per_batch) == 2
    assert get("convlens_scheduler_compute_seconds_sum", per_batch) >= 0.04
    assert get("convlens_scheduler_queue_wait_seconds_count", {"model": "m", "rpc": "Saliency"}) == 5
    assert get("convlens_scheduler_queue_wait_seconds_sum", {"model": "m", "rpc": "Saliency"}) > 0
    assert get("convlens_worker_busy_seconds_total", {"device": "cpu", "lane": "device"}) >= 0.04
