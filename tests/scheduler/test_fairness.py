"""Fairness: a flood for one model (or one key) must not starve another."""

from __future__ import annotations

import asyncio

from .helpers import Recorder, task, wait_until


async def test_flood_for_one_model_does_not_starve_another(make_scheduler, gate) -> None:
    s = await make_scheduler(max_batch_size=4, max_batch_delay=0.01)
    rec = Recorder(gate=gate)
    blocker = asyncio.ensure_future(s.submit(task(-1, rec, model="a", key="block")))
    await wait_until(rec.started.is_set)
    flood = [asyncio.ensure_future(s.submit(task(i, rec, model="a"))) for i in range(40)]
    lone = asyncio.ensure_future(s.submit(task(1000, rec, model="b")))  # submitted last
    await asyncio.sleep(0.05)  # every group is ready now
    gate.set()
    await asyncio.gather(blocker, *flood, lone)
    order = [model for model, _ in rec.batches[1:]]
    # Oldest-first alone would run b after all 10 of a's batches; round robin runs it second.
    assert order.index("b") <= 1, order
    assert order.count("a") == 10


async def test_flood_for_one_key_does_not_starve_another(make_scheduler, gate) -> None:
    s = await make_scheduler(max_batch_size=2, max_batch_delay=0.01)
    rec = Recorder(gate=gate)
    blocker = asyncio.ensure_future(s.submit(task(-1, rec, key="block")))
    await wait_until(rec.started.is_set)
    first = [asyncio.ensure_future(s.submit(task(i, rec, key="x"))) for i in range(2)]
    other = asyncio.ensure_future(s.submit(task(100, rec, key="y")))
    more = [asyncio.ensure_future(s.submit(task(i, rec, key="x"))) for i in range(2, 20)]
    await asyncio.sleep(0.05)
    gate.set()
    await asyncio.gather(blocker, *first, other, *more)
    batches = [b for _, b in rec.batches[1:]]
    # Within a model, the ready group with the oldest task goes first: y waits for one batch of x only.
    assert batches.index([100]) == 1, batches


async def test_two_models_alternate_under_load(make_scheduler, gate) -> None:
    s = await make_scheduler(max_batch_size=2, max_batch_delay=0.0)
    rec = Recorder(gate=gate)
    blocker = asyncio.ensure_future(s.submit(task(-1, rec, model="m")))
    await wait_until(rec.started.is_set)
    subs = [asyncio.ensure_future(s.submit(task(i, rec, model=m))) for m in ("a", "b") for i in range(6)]
    gate.set()
    await asyncio.gather(blocker, *subs)
    assert [m for m, _ in rec.batches[1:]] == ["a", "b", "a", "b", "a", "b"]
