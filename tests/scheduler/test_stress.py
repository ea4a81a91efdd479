"""Many concurrent callers with random keys, deadlines and cancellations: every call ends, nothing leaks."""

from __future__ import annotations

import asyncio
import random
import time

import torch

from convlens.server.errors import DeadlineExceeded, ResourceExhausted

from .helpers import Recorder, task


async def test_mixed_load_settles_every_task(make_scheduler, metrics) -> None:
    rng = random.Random(0)
    s = await make_scheduler(max_batch_size=4, max_batch_delay=0.002, max_queue=64,
                             devices=[torch.device("cpu"), torch.device("meta")])
    rec = Recorder(delay=0.001)

    async def caller(i: int) -> str:
        await asyncio.sleep(rng.random() * 0.05)
        deadline = time.monotonic() + rng.choice([0.001, 0.5, 30])
        t = task(i, rec, model=rng.choice("ab"), key=rng.choice("xyz"), deadline=deadline)
        try:
            if rng.random() < 0.2:
                fut = asyncio.ensure_future(s.submit(t))
                await asyncio.sleep(rng.random() * 0.01)
                fut.cancel()
                try:
                    await fut
                except asyncio.CancelledError:
                    return "cancelled"
                return "ok"
            assert await s.submit(t) == i * 10
            return "ok"
        except DeadlineExceeded:
            return "deadline"
        except ResourceExhausted as exc:
            # deadline-aware admission (#15) refuses at once what the queue cannot compute in time
            return "unmeetable" if "past its deadline" in exc.message else "full"

    outcomes = await asyncio.wait_for(asyncio.gather(*(caller(i) for i in range(300))), 30)
    assert s.queue_depth() == 0
    assert metrics.registry.get_sample_value("convlens_scheduler_queue_depth", {"device": "all"}) == 0
    # On a loaded machine the measured batch time grows and admission refuses more of the 0.5 s callers
    # (before #15 they waited and often expired): served or told at once, more than a third of the callers.
    assert outcomes.count("ok") + outcomes.count("unmeetable") > 100
    computed = rec.payloads
    assert len(computed) == len(set(computed))  # no task computed twice
    for _, batch in rec.batches:
        assert 1 <= len(batch) <= 4
