"""A compute lane whose thread dies (issue #15): its callers get UNAVAILABLE (retryable), a fresh thread with
fresh replicas takes its place, nothing queued is lost, later calls succeed, and a metric counts the restart.
The death is real: SystemExit raised on the lane's thread (as a library's `sys.exit()` would) ends it, by the
test-only hook CONVLENS_TEST_FAULTS=lane_dies=N or by the compute itself."""

from __future__ import annotations

import asyncio
import sys
import threading
from concurrent.futures import Future
from typing import Any

import pytest
import torch

from convlens.server.compute.saliency import SaliencyPayload, compute_saliency
from convlens.server.engine.saliency import SaliencyOptions
from convlens.server.engine.targets import ClassTarget
from convlens.server.errors import Unavailable
from convlens.server.metrics import Metrics
from convlens.server.models.model import ServedModel
from convlens.server.scheduler import BatchPolicy, Scheduler, Task
from convlens.server.scheduler.memory import FAULTS_ENV, injected_faults, lane_death
from convlens.server.scheduler.shards import LaneDied, Shard
from tests.engine.conftest import LiteNet, randomise_batchnorm, seeded
from tests.scheduler.test_layout import images, served

from .helpers import Recorder, task

CPU = torch.device("cpu")


def restarts(metrics: Metrics, lane: str) -> float:
    return metrics.registry.get_sample_value("convlens_worker_lane_restarts_total",
                                             {"device": "cpu", "lane": lane}) or 0.0


def test_a_shard_whose_thread_dies_fails_its_work_and_anything_after_at_once() -> None:
    shard = Shard("test-lane", None)
    shard.start()
    assert shard.submit(lambda: 41 + 1).result(timeout=30) == 42
    died = shard.submit(lambda: sys.exit("a library gave up"))
    with pytest.raises(LaneDied, match="a library gave up"):
        died.result(timeout=30)
    shard.join(30)
    assert not shard.alive and isinstance(shard.died, SystemExit)
    later = shard.submit(lambda: 1)
    assert later.done()  # never queued to a thread that is gone
    with pytest.raises(LaneDied, match="ended earlier"):
        later.result(timeout=0)


def test_work_queued_behind_the_dying_work_fails_too() -> None:
    shard = Shard("test-lane", None)
    shard.start()
    hold = threading.Event()
    dying = shard.submit(lambda: (hold.wait(30), sys.exit("gone")))
    queued: Future[Any] = shard.submit(lambda: "never")
    hold.set()
    for future in (dying, queued):
        with pytest.raises(LaneDied):
            future.result(timeout=30)
    shard.join(30)


def test_an_ordinary_exception_leaves_the_thread_alive() -> None:
    shard = Shard("test-lane", None)
    shard.start()
    with pytest.raises(ZeroDivisionError):
        shard.submit(lambda: 1 / 0).result(timeout=30)
    assert shard.alive and shard.submit(lambda: "still here").result(timeout=30) == "still here"
    shard.stop()
    shard.join(30)


def test_the_lane_fault_is_off_unless_a_test_sets_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FAULTS_ENV, raising=False)
    assert lane_death(injected_faults()) is None
    monkeypatch.setenv(FAULTS_ENV, "lane_dies=2")
    die = lane_death(injected_faults())
    assert die is not None
    die()  # batch 1: nothing
    with pytest.raises(SystemExit, match="batch 2"):
        die()
    die()  # only once


async def test_a_dead_lane_answers_unavailable_is_restarted_and_loses_nothing_queued(
        make_scheduler, metrics: Metrics, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAULTS_ENV, "lane_dies=1")
    s = await make_scheduler(max_batch_size=1, max_batch_delay=0.0)
    compute = Recorder()
    outcomes = await asyncio.gather(*(s.submit(task(i, compute)) for i in range(6)), return_exceptions=True)
    dead = [i for i, o in enumerate(outcomes) if isinstance(o, Unavailable)]
    assert len(dead) == 1, outcomes  # the batch the lane had when it died
    assert "died" in outcomes[dead[0]].message and "retry" in outcomes[dead[0]].message
    assert [o for i, o in enumerate(outcomes) if i != dead[0]] == [i * 10 for i in range(6) if i != dead[0]]
    assert sorted(compute.payloads) == [i for i in range(6) if i != dead[0]]  # the others ran, once each
    assert restarts(metrics, "device") == 1
    assert await s.submit(task(7, compute)) == 70 and s.queue_depth() == 0


async def test_the_compute_killing_its_own_thread_is_answered_unavailable_too(
        make_scheduler, metrics: Metrics) -> None:
    def exits(replica: Any, payloads: Any) -> list[Any]:
        if "exit" in payloads:
            sys.exit("torch extension gave up")
        return list(payloads)

    s = await make_scheduler(max_batch_size=1, max_batch_delay=0.0)
    with pytest.raises(Unavailable):
        await s.submit(task("exit", exits))
    assert await s.submit(task("fine", exits)) == "fine"
    with pytest.raises(Unavailable):  # a second death: a second restart
        await s.submit(task("exit", exits))
    assert await s.submit(task("still fine", exits)) == "still fine"
    assert restarts(metrics, "device") == 2


@pytest.fixture(scope="module")
def lite() -> ServedModel:
    return served(randomise_batchnorm(seeded(LiteNet(), 11)))


async def test_a_dead_shard_gets_a_fresh_thread_and_fresh_replica_and_results_stay_right(
        lite: ServedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAULTS_ENV, "lane_dies=3")  # batches 1 and 2: both shards warm; batch 3 kills one
    metrics = Metrics()
    scheduler = Scheduler(lambda name: lite, [CPU], metrics, policies={"cpu": BatchPolicy(2, 60.0, shards=2)},
                          max_queue=64)  # a batch forms when 2 are queued, and is split between the shards
    payloads = [SaliencyPayload(SaliencyOptions(), image, ClassTarget(i % 5)) for i, image in enumerate(images(2))]
    expected = compute_saliency(lite, payloads)
    threads: dict[str, threading.Thread] = {}  # (the objects are kept: no identity is reused)

    def compute(replica: ServedModel, batch: Any) -> list[Any]:
        threads[threading.current_thread().name] = threading.current_thread()
        return compute_saliency(replica, batch)

    def submit_both() -> Any:
        return asyncio.gather(*(scheduler.submit(Task(model="tiny", rpc="Saliency", key=p.batch_key, payload=p,
                                                      compute=compute)) for p in payloads), return_exceptions=True)

    await scheduler.start()
    try:
        first = await submit_both()
        before = dict(lite.lane_replicas)
        assert set(before) == {"cpu/shard0", "cpu/shard1"}, before
        idents = dict(threads)
        second = await submit_both()
        dead_lane = [lane for lane in ("shard0", "shard1") if restarts(metrics, lane) == 1]
        assert len(dead_lane) == 1 and restarts(metrics, "device") == 0
        assert sum(isinstance(r, Unavailable) for r in second) == 1, second
        assert f"cpu/{dead_lane[0]}" not in lite.lane_replicas  # the dead lane's replica was dropped
        third = await submit_both()
    finally:
        await scheduler.stop(2.0)
    after = lite.lane_replicas
    live_lane = {"shard0": "shard1", "shard1": "shard0"}[dead_lane[0]]
    assert after[f"cpu/{dead_lane[0]}"] is not before[f"cpu/{dead_lane[0]}"]  # made anew on the new thread
    assert after[f"cpu/{live_lane}"] is before[f"cpu/{live_lane}"]
    name = f"convlens-shard-cpu-{dead_lane[0][-1]}"
    assert threads[name] is not idents[name]  # a new thread of the same name computed the third batch
    assert not idents[name].is_alive()
    assert not any(isinstance(r, Exception) for r in [*first, *third])
    for got in [first, second, third]:
        for result, want in zip(got, expected, strict=True):
            if isinstance(result, Unavailable):
                continue
            torch.testing.assert_close(result.attribution, want.attribution, rtol=1e-4,
                                       atol=1e-5 * float(want.attribution.abs().max()))
