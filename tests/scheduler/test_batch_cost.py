"""A batch's summed Task.cost stays within max_batch_cost (issue #15: several large optimisation steps in one
batch need their memory at once); a task over it alone still runs, alone; small tasks batch as before."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import torch

from convlens.server.metrics import Metrics
from convlens.server.scheduler import BatchPolicy, Scheduler

from .helpers import FakeModel, Recorder, task


async def scheduler_with_cost_cap(metrics: Metrics, cap: int) -> Scheduler:
    model = FakeModel("m")
    s = Scheduler(lambda name: model, [torch.device("cpu")], metrics,  # type: ignore[arg-type,return-value]
                  policies={"cpu": BatchPolicy(max_batch_size=8, max_batch_delay=3600.0)}, max_batch_cost=cap)
    await s.start()
    return s


async def test_batches_keep_their_cost_within_the_cap(metrics: Metrics) -> None:
    s = await scheduler_with_cost_cap(metrics, cap=6)
    try:
        recorder = Recorder()
        costs = {0: 3, 1: 3, 2: 3, 3: 3, 4: 7, 5: 6}  # 4 is over the cap alone
        calls = [s.submit(replace(task(p, recorder), cost=c)) for p, c in costs.items()]
        # An hour's batch delay, 8 per batch: only the cost cap makes these groups ready (the bound only
        # turns a hang into a failure)
        results = await asyncio.wait_for(asyncio.gather(*calls), 300)
        assert results == [p * 10 for p in costs]
        for _, batch in recorder.batches:
            assert len(batch) == 1 or sum(costs[p] for p in batch) <= 6, recorder.batches
        assert [4] in [b for _, b in recorder.batches]  # the large one ran, alone
        assert max(len(b) for _, b in recorder.batches) == 2  # and the small ones still batched
    finally:
        await s.stop(2.0)


async def test_without_costs_batches_are_as_before(metrics: Metrics) -> None:
    s = await scheduler_with_cost_cap(metrics, cap=6)
    try:
        recorder = Recorder()
        results = await asyncio.gather(*(s.submit(task(p, recorder)) for p in range(8)))  # cost 0: free
        assert results == [p * 10 for p in range(8)]
        assert [len(b) for _, b in recorder.batches] == [8]
    finally:
        await s.stop(2.0)
