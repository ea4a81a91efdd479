"""Dynamic batching: grouping by key, size and delay limits, multiple devices, real ServedModel."""

from __future__ import annotations

import asyncio
import math
import threading
import time

import pytest
import torch
from torch import nn

from convlens.server.metrics import Metrics
from convlens.server.models.model import Preprocess, ServedModel
from convlens.server.scheduler import BatchPolicy, Scheduler, Task

from .helpers import Recorder, task, wait_until


@pytest.mark.parametrize("n,size", [(10, 4), (8, 8), (3, 1)])
async def test_same_key_tasks_share_batches(make_scheduler, n: int, size: int) -> None:
    # A long delay: batches go only because they are full, or the last one after the delay.
    s = await make_scheduler(max_batch_size=size, max_batch_delay=0.2)
    rec = Recorder()
    results = await asyncio.gather(*(s.submit(task(i, rec)) for i in range(n)))
    assert results == [i * 10 for i in range(n)]
    assert len(rec.batches) == math.ceil(n / size)
    assert all(len(b) <= size for _, b in rec.batches)
    assert sorted(rec.payloads) == list(range(n))


async def test_different_keys_never_share_a_batch(make_scheduler) -> None:
    s = await make_scheduler(max_batch_size=8, max_batch_delay=0.05)
    rec = Recorder()
    keys = ["x", "y", "z"]
    submits = [s.submit(task(i, rec, key=keys[i % 3])) for i in range(12)]
    submits += [s.submit(task(100, rec, rpc="Other", key="x")), s.submit(task(200, rec, model="a", key="x"))]
    await asyncio.gather(*submits)
    # key, rpc and model are all part of the batch key.
    assert sorted(sorted(b) for _, b in rec.batches) == [
        [0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11], [100], [200]]


async def test_lone_task_goes_after_max_batch_delay(make_scheduler) -> None:
    s = await make_scheduler(max_batch_size=8, max_batch_delay=0.1)
    rec = Recorder()
    t0 = time.monotonic()
    assert await asyncio.wait_for(s.submit(task(1, rec)), 5) == 10
    elapsed = time.monotonic() - t0
    assert 0.09 <= elapsed < 2.0


async def test_a_caller_who_is_alone_does_not_wait_for_companions(make_scheduler) -> None:
    """One caller at a time (the last batch ran alone, nobody arrived meanwhile): no max_batch_delay."""
    s = await make_scheduler(max_batch_size=8, max_batch_delay=2.0)
    rec = Recorder()
    # A fresh worker assumes company: the first lone task waits the delay...
    assert await asyncio.wait_for(s.submit(task(0, rec)), 10) == 0
    for i in range(1, 4):  # ...then, seeing one caller at a time, it stops waiting (2 s would trip wait_for)
        assert await asyncio.wait_for(s.submit(task(i, rec)), 1.5) == 10 * i
    assert [b for _, b in rec.batches] == [[0], [1], [2], [3]]
    # Company brings the delay back: two callers together wait for more, then go as one batch.
    assert await asyncio.wait_for(asyncio.gather(s.submit(task(5, rec)), s.submit(task(6, rec))), 10) == [50, 60]
    assert rec.batches[-1] == ("m", [5, 6])


async def test_full_group_goes_at_once(make_scheduler) -> None:
    s = await make_scheduler(max_batch_size=2, max_batch_delay=30.0)
    rec = Recorder()
    t0 = time.monotonic()
    pair = asyncio.gather(s.submit(task(1, rec)), s.submit(task(2, rec)))
    assert await asyncio.wait_for(pair, 5) == [10, 20]
    assert time.monotonic() - t0 < 2.0
    assert rec.batches == [("m", [1, 2])]


async def test_tasks_queued_behind_a_busy_worker_are_batched(make_scheduler, gate) -> None:
    s = await make_scheduler(max_batch_size=4, max_batch_delay=0.0)
    rec = Recorder(gate=gate)
    first = asyncio.ensure_future(s.submit(task(0, rec)))
    await wait_until(rec.started.is_set)
    rest = [asyncio.ensure_future(s.submit(task(i, rec))) for i in range(1, 7)]
    await wait_until(lambda: s.queue_depth() == 6)
    gate.set()
    await asyncio.gather(first, *rest)
    assert [b for _, b in rec.batches] == [[0], [1, 2, 3, 4], [5, 6]]  # oldest first, up to max size


async def test_groups_go_to_whichever_worker_is_free(make_scheduler, fake_models) -> None:
    # Two workers ("meta" stands in for a second device: the fake model ignores it).
    s = await make_scheduler(max_batch_size=1, max_batch_delay=0.0,
                             devices=[torch.device("cpu"), torch.device("meta")])
    both = threading.Barrier(2, timeout=5)  # passes only if two batches compute at the same time

    def compute(replica, payloads):
        both.wait()
        return [threading.current_thread().name for _ in payloads]

    names = await asyncio.wait_for(asyncio.gather(s.submit(task(1, compute)), s.submit(task(2, compute))), 10)
    assert sorted(names) == ["convlens-worker-cpu", "convlens-worker-meta"]
    assert set(fake_models["m"].replicas) == {torch.device("cpu"), torch.device("meta")}


async def test_real_served_model_and_replica_cache() -> None:
    module = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    model = ServedModel(name="tiny", format="embedded", module=module,
                        preprocess=Preprocess(8, 8, 8, (0.5,) * 3, (0.5,) * 3), labels=["a", "b"],
                        supports_gradients=True)
    lookups: list[str] = []

    def models(name: str) -> ServedModel:
        lookups.append(name)
        return model

    seen: set[int] = set()

    def forward(replica: ServedModel, payloads):
        seen.add(id(replica))
        with torch.no_grad():
            return list(replica.module(torch.stack(payloads)))

    s = Scheduler(models, [torch.device("cpu")], Metrics(),
                  policies={"cpu": BatchPolicy(max_batch_size=4, max_batch_delay=0.05)})
    await s.start()
    try:
        images = [torch.rand(3, 8, 8) for _ in range(6)]
        outs = await asyncio.gather(*(s.submit(task(x, forward, model="tiny")) for x in images))
        with torch.no_grad():
            expected = module(torch.stack(images))
        assert torch.allclose(torch.stack(outs), expected, atol=1e-6)
        # A task without its copy runs on the copy its name serves now (looked up per batch); the replica is
        # made once per (copy, lane) and kept by the copy: every replica that computed is the cached one.
        assert set(lookups) == {"tiny"}
        assert seen == {id(r) for r in model.lane_replicas.values()} and model.lane_replicas
    finally:
        await s.stop(1.0)


async def test_two_copies_of_one_model_never_share_a_batch() -> None:
    """A reload's old and new copies have the same name and the same batch key: their tasks, queued together
    and interleaved, still go in two batches, each computed on its own copy's weights."""
    def copy(seed: int, copy_id: int) -> ServedModel:
        torch.manual_seed(seed)
        module = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
        return ServedModel(name="tiny", format="embedded", module=module,
                           preprocess=Preprocess(8, 8, 8, (0.5,) * 3, (0.5,) * 3), labels=["a", "b"],
                           supports_gradients=True, copy_id=copy_id)

    old, new = copy(1, 1), copy(2, 2)
    gate, holding = threading.Event(), threading.Event()
    batches: list[list[int]] = []  # the copy each batch's payloads were computed on, per payload

    def hold(replica: ServedModel, payloads):
        holding.set()
        assert gate.wait(60), "the test never opened the gate"
        return [0 for _ in payloads]

    def forward(replica: ServedModel, payloads):
        batches.append([replica.copy_id for _ in payloads])
        with torch.no_grad():
            return list(replica.module(torch.stack(payloads)))

    s = Scheduler(lambda name: new, [torch.device("cpu")], Metrics(),
                  policies={"cpu": BatchPolicy(max_batch_size=8, max_batch_delay=0.0, shards=1)})
    await s.start()
    try:
        busy = asyncio.ensure_future(s.submit(task(None, hold, model="tiny", key="hold")))
        await wait_until(holding.is_set, timeout=60)  # the only worker is busy until the gate opens
        images = [torch.rand(3, 8, 8) for _ in range(4)]
        copies = [old, new, old, new]
        calls = [asyncio.ensure_future(s.submit(Task(model="tiny", rpc="Saliency", key="k", payload=x,
                                                     compute=forward, served=c)))
                 for x, c in zip(images, copies, strict=True)]
        await wait_until(lambda: s.queue_depth() == 4, timeout=60)  # all four wait behind the held batch
        gate.set()
        outs = await asyncio.gather(*calls)
        await busy
    finally:
        gate.set()
        await s.stop(1.0)
    assert sorted(batches) == [[1, 1], [2, 2]]  # two batches, one copy each
    with torch.no_grad():
        for x, c, out in zip(images, copies, outs, strict=True):
            assert torch.allclose(out, c.module(x[None])[0], atol=1e-6)  # its own copy's weights
            other = new if c is old else old
            assert not torch.allclose(out, other.module(x[None])[0], atol=1e-3)


def test_batch_policy_validates() -> None:
    assert BatchPolicy() == BatchPolicy(max_batch_size=8, max_batch_delay=0.005)
    with pytest.raises(ValueError, match="max_batch_size"):
        BatchPolicy(max_batch_size=0)
    with pytest.raises(ValueError, match="max_batch_delay"):
        BatchPolicy(max_batch_delay=-1)


def test_scheduler_refuses_policy_for_unknown_device() -> None:
    with pytest.raises(ValueError, match="cuda:0"):
        Scheduler(lambda n: None, [torch.device("cpu")], Metrics(), policies={"cuda:0": BatchPolicy()})
    with pytest.raises(ValueError, match="max_queue"):
        Scheduler(lambda n: None, [torch.device("cpu")], Metrics(), max_queue=0)
    with pytest.raises(ValueError, match="device"):
        Scheduler(lambda n: None, [], Metrics())
