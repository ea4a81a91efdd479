"""Optimisation streams under stress (#15): a cancellation storm among companions, a reader that stops
reading, and readers that vanish (a closed channel; a killed client process).

An in-process server on the tiny network of tests/streaming/conftest.py, so that the scheduler's own state
(jobs, step groups, queue), the replicas' hooks and the job objects themselves can be checked afterwards.
Nothing here waits on time for correctness: each check waits for observable state (with a generous bound
that only turns a hang into a failure). The long version with figures is tools/reliability/storm.py.
"""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from convlens.server.app import ConvLensServer
from convlens.server.engine.optimize.dream import DreamJob
from convlens.server.engine.optimize.maximize import MaximizeJob
from convlens.server.engine.optimize.style import StyleJob
from convlens.v1 import convlens_pb2_grpc as pb_grpc
from tests.streaming.conftest import MODEL, tiny_server
from tools.reliability.storm import RPCS, Outcome, Streams, alone, difference, plan, storm, stream

ROOT = Path(__file__).resolve().parents[2]  # the reader subprocess runs `python -m tools.reliability.reader`
SPEC = Streams(model=MODEL, dream_layer="stage1", steps=12)
STORM = 100  # cancelled streams
# Companions' images alone vs among the storm: the batched convolutions round differently from single ones,
# which Adam and the uint8 image can carry into a grey level or two here and there (the same tolerance as
# tests/streaming/test_dream_style_rpc.py's batched-vs-alone checks).
MAX_GREY_LEVELS, MEAN_GREY_LEVELS = 2, 0.05


@pytest.fixture()
async def server() -> AsyncIterator[ConvLensServer]:
    async with tiny_server(max_jobs=STORM + 2 * len(RPCS)) as srv:
        yield srv


@pytest.fixture()
async def channel(server: ConvLensServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


async def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Poll observable state; the bound only turns a hang into a failure (never a timing assertion)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        assert loop.time() < end, f"not reached within {timeout:.0f}s: {what}"
        await asyncio.sleep(0.005)


def jobs_alive() -> int:
    """Optimisation job objects alive in this process (compared with a test's own start: other tests may
    hold theirs)."""
    gc.collect()
    return sum(type(o) in (MaximizeJob, DreamJob, StyleJob) for o in gc.get_objects())  # (not isinstance: it
    # reads __class__, which warns on some of torch's deprecated objects)


def hooks_left(server: ConvLensServer) -> int:
    model = server.repository.get(MODEL)
    modules = [model.module] + [r.module for r in model.lane_replicas.values()]
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for module in modules for m in module.modules())


def step_batches(server: ConvLensServer, rpc: str) -> tuple[float, float]:
    """(steps computed, of them in batches of more than one job) from the step-batch histogram."""
    metric = server.metrics.step_batch_size.labels(model=MODEL, rpc=rpc)
    buckets = {float(s.labels["le"]): s.value for m in metric.collect() for s in m.samples
               if s.name.endswith("_bucket")}
    return buckets[float("inf")], buckets[float("inf")] - buckets.get(1.0, 0.0)


def idle(server: ConvLensServer) -> bool:
    scheduler = server._scheduler
    gauges = [server.metrics.active_jobs.labels(rpc=rpc)._value.get() for rpc in RPCS]
    return (scheduler.active_jobs() == 0 and scheduler.queue_depth() == 0 and not scheduler._jobs.groups
            and not any(w.busy for w in scheduler._workers) and gauges == [0, 0, 0])


async def serving(server: ConvLensServer) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=30)
    return int(reply.status)


def same_as_alone(together: Outcome, reference: Outcome) -> None:
    assert together.code == grpc.StatusCode.OK and together.steps == reference.steps
    largest, mean = difference(together, reference)
    assert largest <= MAX_GREY_LEVELS and mean < MEAN_GREY_LEVELS, (together.rpc, largest, mean)


async def test_a_storm_of_cancelled_streams_leaves_nothing_behind_and_companions_unchanged(
        server: ConvLensServer, channel: grpc.aio.Channel) -> None:
    jobs_before = jobs_alive()
    reference = await alone(channel, SPEC)
    assert all(o.code == grpc.StatusCode.OK and o.steps == list(range(1, len(o.steps) + 1))
               for o in reference.values())
    await wait_until(lambda: idle(server), "idle after the reference runs")
    tasks_before = len(asyncio.all_tasks())
    batched_before = {rpc: step_batches(server, rpc)[1] for rpc in RPCS}

    companions, cancelled = await asyncio.wait_for(storm(channel, SPEC, STORM, seed=15), 600)

    # The storm really was one: every stream ended as planned, at its planned step, and steps were shared.
    planned = plan(STORM, 15, SPEC.steps)
    assert [len(o.steps) for o in cancelled] == [after for _, _, after in planned]
    assert all(o.cancelled_by_us and o.result is None for o in cancelled)
    assert sum(after == 0 for *_, after in planned) >= 3  # some cancelled before their first event, too
    for rpc in RPCS:
        assert step_batches(server, rpc)[1] > batched_before[rpc], f"{rpc}: no step shared a batch"
    # Every companion got what it gets alone.
    for rpc in RPCS:
        same_as_alone(companions[rpc], reference[rpc])
    # And nothing is left: no job, step group, queued task or busy lane; no hook on any replica; every job's
    # state freed; the loop's tasks back to what they were; the server healthy.
    await wait_until(lambda: idle(server), "no job, group, queued task or busy lane")
    await wait_until(lambda: jobs_alive() <= jobs_before, "every job object freed")
    assert hooks_left(server) == 0
    await wait_until(lambda: len(asyncio.all_tasks()) <= tasks_before, "the loop's tasks back to baseline")
    assert await serving(server) == health_pb2.HealthCheckResponse.SERVING


# ---- a reader that stops reading ----

# grpc lets ~2-3 MB of a stream's messages go unread before the server's write blocks (measured here: 1,531
# steps with 32 px previews, 34 with 256 px ones; docs/reliability.md): 256 px previews (~84 KB each) make the
# pause come after a few dozen steps, and 120 steps (~10 MB) are more than any window lets through.
SLOW = Streams(model=MODEL, dream_layer="stage1", steps=120, size=256)
COMPANION = Streams(model=MODEL, dream_layer="stage1", steps=12, size=256)  # same step key as SLOW's job


def steps_done(server: ConvLensServer, rpc: str = "MaximizeUnit") -> float:
    return server.metrics.steps.labels(model=MODEL, rpc=rpc)._value.get()


async def test_a_reader_that_stops_reading_pauses_its_job_and_companions_go_on(
        server: ConvLensServer, channel: grpc.aio.Channel) -> None:
    scheduler = server._scheduler
    slow_alone = await stream(channel, "MaximizeUnit", SLOW.request("MaximizeUnit", 3))
    companion_alone = await stream(channel, "MaximizeUnit", COMPANION.request("MaximizeUnit", 7))
    before = steps_done(server)

    slow_channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")  # the slow reader's own connection
    call = pb_grpc.InspectionServiceStub(slow_channel).MaximizeUnit(SLOW.request("MaximizeUnit", 3), timeout=300)
    first = await call.read()
    assert first.progress.step == 1
    # The reader stops reading. grpc's flow control stops the server's writes once its window is full; the
    # job, whose next step is only asked for when its event is taken, pauses there: no compute, no step queued.
    await wait_until(lambda: scheduler.waiting_jobs() == 1, "the job waits for its reader")
    assert scheduler.active_jobs() == 1 and scheduler.queue_depth() == 0
    # Meanwhile a companion with the same step key is served, and gets what it gets alone.
    companion = await asyncio.wait_for(stream(channel, "MaximizeUnit", COMPANION.request("MaximizeUnit", 7)), 120)
    same_as_alone(companion, companion_alone)
    # (On a loaded machine the first wait may have seen a moment's delay, not yet the full window: wait again.)
    await wait_until(lambda: scheduler.waiting_jobs() == 1, "the job still waits for its reader")
    paused_at = steps_done(server) - before - COMPANION.steps
    assert 1 <= paused_at < SLOW.steps and scheduler.active_jobs() == 1  # bounded: it did not run on, buffering
    # The reader comes back: every event is there, in order, and the job ends as it does alone.
    rest = Outcome("MaximizeUnit", steps=[first.progress.step])
    while (response := await call.read()) is not grpc.aio.EOF:
        if response.WhichOneof("event") == "progress":
            rest.steps.append(response.progress.step)
        else:
            rest.result = response.result
    rest.code = await call.code()
    await slow_channel.close()
    assert rest.steps == list(range(1, SLOW.steps + 1))
    same_as_alone(rest, slow_alone)
    await wait_until(lambda: idle(server) and scheduler.waiting_jobs() == 0, "idle after the slow reader")


async def test_a_reader_that_never_comes_back_is_cancelled_at_its_deadline(
        server: ConvLensServer, channel: grpc.aio.Channel) -> None:
    scheduler = server._scheduler
    jobs_before = jobs_alive()
    call = pb_grpc.InspectionServiceStub(channel).MaximizeUnit(
        Streams(model=MODEL, dream_layer="stage1", steps=4000, size=256).request("MaximizeUnit", 3), timeout=8)
    await call.read()
    # (On a very loaded machine the deadline may come before the pause; the job must be freed either way.)
    await wait_until(lambda: scheduler.waiting_jobs() == 1 or scheduler.active_jobs() == 0, "the job paused")
    await wait_until(lambda: scheduler.active_jobs() == 0, "the job freed at its deadline")
    assert scheduler.waiting_jobs() == 0 and idle(server)
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        while await call.read() is not grpc.aio.EOF:  # the events buffered before the pause, then the status
            pass
    assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await wait_until(lambda: jobs_alive() <= jobs_before, "the job's state freed")
    assert await serving(server) == health_pb2.HealthCheckResponse.SERVING
    again = await stream(channel, "MaximizeUnit", SPEC.request("MaximizeUnit", 1))
    assert again.code == grpc.StatusCode.OK


# ---- readers that vanish ----

async def test_a_closed_channel_cancels_its_job_and_its_companion_is_unaffected(
        server: ConvLensServer, channel: grpc.aio.Channel) -> None:
    jobs_before = jobs_alive()
    reference = await stream(channel, "MaximizeUnit", SPEC.request("MaximizeUnit", 7))
    gone = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    call = pb_grpc.InspectionServiceStub(gone).MaximizeUnit(
        Streams(model=MODEL, dream_layer="stage1", steps=4000).request("MaximizeUnit", 2), timeout=300)
    await call.read()
    companion = asyncio.create_task(stream(channel, "MaximizeUnit", SPEC.request("MaximizeUnit", 7)))
    await call.read()
    await gone.close()  # the connection goes; no cancel was sent for the call itself
    same_as_alone(await asyncio.wait_for(companion, 120), reference)
    await wait_until(lambda: idle(server), "idle")
    await wait_until(lambda: jobs_alive() <= jobs_before, "every job object freed")
    assert hooks_left(server) == 0 and await serving(server) == health_pb2.HealthCheckResponse.SERVING


async def test_a_killed_client_process_that_stopped_reading_frees_its_job(
        server: ConvLensServer, channel: grpc.aio.Channel) -> None:
    scheduler = server._scheduler
    jobs_before = jobs_alive()
    reference = await stream(channel, "MaximizeUnit", COMPANION.request("MaximizeUnit", 7))
    reader = subprocess.Popen([sys.executable, "-m", "tools.reliability.reader", f"127.0.0.1:{server.port}",
                               MODEL, "--read", "2", "--size", "256"], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert reader.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(reader.stdout.readline), 120)
        assert line.strip() == "read 2"
        await wait_until(lambda: scheduler.waiting_jobs() == 1, "the reader's job paused (it stopped reading)")
        companion = await stream(channel, "MaximizeUnit", COMPANION.request("MaximizeUnit", 7))
        same_as_alone(companion, reference)
        reader.kill()  # no goodbye: the kernel closes its socket
        await asyncio.to_thread(reader.wait)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
        if reader.stdout is not None:
            reader.stdout.close()
    await wait_until(lambda: idle(server) and scheduler.waiting_jobs() == 0, "the killed reader's job freed")
    await wait_until(lambda: jobs_alive() <= jobs_before, "its state freed")
    assert await serving(server) == health_pb2.HealthCheckResponse.SERVING
