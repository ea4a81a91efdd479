"""A CPU worker with shards splits each batch of two or more tasks between its compute threads, each with
its share of the intra-op threads and a module of its own; a lone task runs on the worker with all of
them. The results are those of one unsplit compute, in order, whatever the methods' hooks do."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
import torch

from convlens.server.compute.saliency import SaliencyPayload, compute_saliency
from convlens.server.engine.saliency import SaliencyOptions
from convlens.server.engine.targets import ClassTarget, UnitTarget
from convlens.server.metrics import Metrics
from convlens.server.models.model import ServedModel
from convlens.server.scheduler import BatchPolicy, Scheduler, Task
from convlens.server.scheduler.contention import Contention
from convlens.server.scheduler.policy import policies_for
from convlens.server.scheduler.shards import process_default_threads, set_process_default_threads, split
from tests.engine.conftest import LiteNet, randomise_batchnorm, seeded
from tests.scheduler.test_layout import images, served

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def lite() -> ServedModel:
    return served(randomise_batchnorm(seeded(LiteNet(), 5)))


@pytest.mark.parametrize("n, parts", [(1, 2), (2, 2), (5, 2), (7, 3), (3, 8), (8, 2)])
def test_split_is_contiguous_near_equal_and_complete(n: int, parts: int) -> None:
    items = list(range(n))
    chunks = split(items, parts)
    assert [x for c in chunks for x in c] == items
    assert len(chunks) == min(n, parts) and all(chunks)
    assert max(map(len, chunks)) - min(map(len, chunks)) <= 1


def test_shards_are_refused_on_a_gpu() -> None:
    with pytest.raises(ValueError, match="not CPUs"):
        policies_for([CPU, torch.device("cuda", 0)], {"cuda:0": BatchPolicy(8, 0.0, 2)})
    with pytest.raises(ValueError, match="shards must be >= 1"):
        BatchPolicy(8, 0.0, 0)


async def _submit_all(scheduler: Scheduler, payloads: list[Any], compute: Any) -> list[Any]:
    tasks = [Task(model="tiny", rpc="Saliency", key=p.batch_key, payload=p, compute=compute) for p in payloads]
    return list(await asyncio.gather(*(scheduler.submit(t) for t in tasks)))


def _scheduler(model: ServedModel, policy: BatchPolicy, *, lone_all_threads: bool = False) -> Scheduler:
    return Scheduler(lambda name: model, [CPU], Metrics(), policies={"cpu": policy}, max_queue=64,
                     lone_all_threads=lone_all_threads)


async def test_a_batch_is_split_between_shard_threads_and_a_lone_task_runs_on_the_worker(
        lite: ServedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Contention, "busy", lambda self, now=None: False)  # (on busy CPUs: a shard, test_contention)
    seen: list[tuple[str, int, int, int]] = []  # thread, intra-op threads, chunk size, module id

    def compute(replica: ServedModel, payloads: Any) -> list[Any]:
        seen.append((threading.current_thread().name, torch.get_num_threads(), len(payloads), id(replica.module)))
        return compute_saliency(replica, payloads)

    total = torch.get_num_threads()
    default = process_default_threads()
    scheduler = _scheduler(lite, BatchPolicy(6, 60.0, shards=2))  # a batch forms only when 6 are queued
    await scheduler.start()
    try:
        payloads = [SaliencyPayload(SaliencyOptions(), image, ClassTarget(i % 5)) for i, image in
                    enumerate(images(6))]
        batched = await _submit_all(scheduler, payloads, compute)
        lone_policy = _scheduler(lite, BatchPolicy(1, 0.0, shards=2), lone_all_threads=True)
        await lone_policy.start()
        try:
            (alone,) = await _submit_all(lone_policy, payloads[:1], compute)
        finally:
            await lone_policy.stop(2.0)
    finally:
        await scheduler.stop(2.0)
    shard_calls, lone_call = seen[:2], seen[2]
    assert sorted(size for _, _, size, _ in shard_calls) == [3, 3]
    assert len({name for name, *_ in shard_calls}) == 2 and all("shard" in name for name, *_ in shard_calls)
    assert all(threads == max(1, total // 2) for _, threads, _, _ in shard_calls)
    assert len({module for *_, module in shard_calls}) == 2 and id(lite.module) not in {m for *_, m in shard_calls}
    assert "worker" in lone_call[0] and lone_call[1] == total and lone_call[2] == 1
    assert torch.get_num_threads() == total, "this thread's count must be left as it was"
    assert process_default_threads() == default, "so must the count new threads start with"
    expected = compute_saliency(lite, payloads)
    for got, want in zip([*batched, alone], [*expected, expected[0]], strict=True):
        assert got.target == want.target
        torch.testing.assert_close(got.attribution, want.attribution, rtol=1e-4,
                                   atol=1e-5 * float(want.attribution.abs().max()))


@pytest.mark.parametrize("lone_all_threads", [False, True])
async def test_a_lone_optimisation_step_runs_on_a_shard_not_with_every_thread(
        lite: ServedModel, lone_all_threads: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A job's steps must run in the same float order alone or batched: the intra-op thread count changes
    it (a MaximizeUnit job on Lite0 ended 2.3 grey levels apart after 32 steps on 1 vs 2 threads), so a
    step never takes the device lane's thread team, even alone. A lone one-shot task runs on a shard too by
    default (a thread team collapses on shared cores), on every thread with `lone_all_threads`."""
    monkeypatch.setattr(Contention, "busy", lambda self, now=None: False)  # (busy CPUs: test_contention)
    seen: list[tuple[str, int]] = []

    def compute(replica: ServedModel, payloads: Any) -> list[Any]:
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return list(payloads)

    total = torch.get_num_threads()
    scheduler = _scheduler(lite, BatchPolicy(1, 0.0, shards=2), lone_all_threads=lone_all_threads)
    await scheduler.start()
    try:
        step = Task(model="tiny", rpc="MaximizeUnit", key="k", payload="step", compute=compute, quorum=lambda: 1)
        assert await scheduler.submit(step) == "step"
        one_shot = Task(model="tiny", rpc="Saliency", key="k", payload="once", compute=compute)
        assert await scheduler.submit(one_shot) == "once"
    finally:
        await scheduler.stop(2.0)
    (step_thread, step_threads), (lone_thread, lone_threads) = seen
    assert "shard" in step_thread and step_threads == max(1, total // 2)
    if lone_all_threads:
        assert "worker" in lone_thread and lone_threads == total
    else:
        assert "shard" in lone_thread and lone_threads == max(1, total // 2)


@pytest.mark.parametrize("method", ["guided_backprop", "deconvnet", "grad_cam"])
async def test_hooking_methods_give_the_unsplit_results_under_load(lite: ServedModel, method: str) -> None:
    """Methods that hook the module (ReLU rules, Grad-CAM's layer) run in both shards at once: each
    shard's hooks must only see its own forward."""
    scheduler = _scheduler(lite, BatchPolicy(8, 0.001, shards=2))
    await scheduler.start()
    try:
        targets = [None, ClassTarget(3), UnitTarget("_blocks.1._depthwise_conv", 5, y=6, x=6)]
        payloads = [SaliencyPayload(SaliencyOptions(method=method), image, targets[i % 3])
                    for i, image in enumerate(images(16))]
        got = await _submit_all(scheduler, payloads, compute_saliency)
    finally:
        await scheduler.stop(2.0)
    for a, b in zip(got, compute_saliency(lite, payloads), strict=True):
        torch.testing.assert_close(a.attribution, b.attribution, rtol=1e-4,
                                   atol=1e-5 * float(b.attribution.abs().max()))


async def test_a_failing_chunk_fails_only_its_callers_and_the_worker_goes_on(lite: ServedModel) -> None:
    def compute(replica: ServedModel, payloads: Any) -> list[Any]:
        if any(p == "boom" for p in payloads):
            raise RuntimeError("boom")
        return [f"ok {p}" for p in payloads]

    scheduler = _scheduler(lite, BatchPolicy(4, 60.0, shards=2))
    await scheduler.start()
    try:
        tasks = [Task(model="tiny", rpc="Saliency", key="k", payload=p, compute=compute)
                 for p in ["a", "b", "c", "boom"]]
        results = await asyncio.gather(*(scheduler.submit(t) for t in tasks), return_exceptions=True)
        assert results[:2] == ["ok a", "ok b"]  # the other shard's chunk
        assert all(isinstance(r, RuntimeError) for r in results[2:])
        again = [Task(model="tiny", rpc="Saliency", key="k", payload=p, compute=compute) for p in "wxyz"]
        assert await asyncio.gather(*(scheduler.submit(t) for t in again)) == [f"ok {p}" for p in "wxyz"]
    finally:
        await scheduler.stop(2.0)


async def test_busy_seconds_are_counted_per_lane_each_within_its_wall_time(lite: ServedModel) -> None:
    def compute(replica: ServedModel, payloads: Any) -> list[Any]:
        time.sleep(0.05)
        return list(payloads)

    metrics = Metrics()
    scheduler = Scheduler(lambda name: lite, [CPU], metrics, policies={"cpu": BatchPolicy(2, 0.001, shards=2)},
                          max_queue=64)
    await scheduler.start()
    try:
        start = time.monotonic()
        tasks = [Task(model="tiny", rpc="Saliency", key="k", payload=i, compute=compute) for i in range(8)]
        assert await asyncio.gather(*(scheduler.submit(t) for t in tasks)) == list(range(8))
        wall = time.monotonic() - start
    finally:
        await scheduler.stop(2.0)
    busy = {lane: metrics.registry.get_sample_value("convlens_worker_busy_seconds_total",
                                                     {"device": "cpu", "lane": lane}) or 0.0
            for lane in ("device", "shard0", "shard1")}
    assert busy["shard0"] >= 0.05 and busy["shard1"] >= 0.05  # both shards computed
    assert all(seconds <= wall for seconds in busy.values()), (busy, wall)  # a lane is busy at most all the time
    assert sum(busy.values()) >= 4 * 0.05  # 8 tasks in batches of at most 2: at least 4 batches of 50 ms


def test_the_process_default_is_set_apart_from_the_callers_count() -> None:
    mine, default = torch.get_num_threads(), process_default_threads()
    try:
        set_process_default_threads(1)
        assert process_default_threads() == 1 and torch.get_num_threads() == mine
    finally:
        set_process_default_threads(default)
    assert process_default_threads() == default


async def test_the_worker_takes_its_thread_count_from_the_scheduler(lite: ServedModel) -> None:
    seen: list[int] = []

    def compute(replica: ServedModel, payloads: Any) -> list[Any]:
        seen.append(torch.get_num_threads())
        return [None] * len(payloads)

    scheduler = Scheduler(lambda name: lite, [CPU], Metrics(), policies={"cpu": BatchPolicy(4, 0.01, shards=2)},
                          threads=1)  # the four of the second submit are queued in one loop turn: one batch
    await scheduler.start()
    try:
        await _submit_all(scheduler, [SaliencyPayload(SaliencyOptions(), images(1)[0], None)], compute)
        await _submit_all(scheduler, [SaliencyPayload(SaliencyOptions(), im, None) for im in images(4)], compute)
    finally:
        await scheduler.stop(2.0)
    assert seen == [1, 1, 1]  # the lone task on the worker, then two shards with max(1, 1 // 2) each
