"""The step scheduler: jobs stepped together through the batcher, joining and leaving between steps;
admission per job; cancellation and deadlines; fairness beside one-shot work."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest
import torch

from convlens.server.engine.optimize.maximize import MaximizeJob, MaximizeSettings
from convlens.server.engine.optimize.objectives import ClassLogit
from convlens.server.engine.optimize.runner import run_step
from convlens.server.errors import DeadlineExceeded, ResourceExhausted
from convlens.server.metrics import Metrics
from convlens.server.models.model import Preprocess, ServedModel
from convlens.server.scheduler import BatchPolicy, Scheduler, Task
from convlens.server.scheduler.batcher import Batcher, Entry
from tests.engine.conftest import LiteNet, seeded

from .helpers import Recorder, wait_until

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
# The worker's replica runs in channels_last, the reference below in the default layout: convolutions
# differ by ~1e-7, and Adam turns that into up to a few 1e-4 on pixels whose gradient is near zero (its
# first step is lr * sign(g)). Invisible on a 0..1 image; tests/engine/test_optimize_runner.py checks the
# same property at 1e-5 with one module.
CLOSE = {"rtol": 0.0, "atol": 2e-3}


def served() -> ServedModel:
    pre = Preprocess(24, 24, 24, MEAN, STD)
    return ServedModel(name="tiny", format="embedded", module=seeded(LiteNet()), preprocess=pre,
                       labels=[f"c{i}" for i in range(5)], supports_gradients=True)


def settings(seed: int, steps: int = 6, **kw) -> MaximizeSettings:
    return MaximizeSettings.resolve("lucid", steps=steps, size=24, seed=seed, pad=2, jitter=2, final_jitter=1, **kw)


def make_job(seed: int, device: torch.device, steps: int = 6, target: int | None = None) -> MaximizeJob:
    objective = ClassLogit(seed % 5 if target is None else target)
    return MaximizeJob(settings(seed, steps), objective, mean=MEAN, std=STD, device=device)


def alone_image(seed: int, steps: int = 6) -> torch.Tensor:
    job = make_job(seed, torch.device("cpu"), steps)
    module = served().module
    while not job.done:
        run_step(module, [job])
    return job.image()


@pytest.fixture
async def scheduler_factory():
    made: list[Scheduler] = []
    model = served()

    async def make(max_batch_size: int = 8, max_batch_delay: float = 0.005, max_queue: int = 256,
                   max_jobs: int = 64, metrics: Metrics | None = None) -> Scheduler:
        def lookup(name: str):
            return model if name == "tiny" else recorder_models[name]
        s = Scheduler(lookup, [torch.device("cpu")], metrics or Metrics(),
                      policies={"cpu": BatchPolicy(max_batch_size, max_batch_delay)},
                      max_queue=max_queue, max_jobs=max_jobs)
        await s.start()
        made.append(s)
        return s

    yield make
    for s in made:
        await s.stop(2.0)


class Named:
    def __init__(self, name: str) -> None:
        self.name = name

    def replica(self, device, memory_format=None, *, fresh=False):
        return self


recorder_models = {"other": Named("other"), "tiny-oneshot": Named("tiny-oneshot")}


async def run_job(scheduler: Scheduler, seed: int, steps: int = 6, reports: list | None = None,
                  started: asyncio.Event | None = None, deadline: float | None = None,
                  created: list | None = None) -> torch.Tensor:
    async with scheduler.job(model="tiny", rpc="MaximizeUnit", deadline=deadline) as handle:
        job = make_job(seed, handle.device, steps)
        if created is not None:
            created.append(weakref.ref(job))
        async for report in handle.steps(job):
            if reports is not None:
                reports.append(report)
            if started is not None:
                started.set()
        return job.image()


async def test_progress_reports_then_done_and_a_lone_job_never_waits_the_batch_delay(scheduler_factory):
    # A 60 s batch delay: were a lone job's steps to wait for companions, this would time out.
    s = await scheduler_factory(max_batch_delay=60.0)
    reports: list = []
    image = await asyncio.wait_for(run_job(s, seed=3, reports=reports), 20)
    assert [r.step for r in reports] == list(range(1, 7)) and reports[-1].done
    assert all(r.total_steps == 6 and "objective" in r.terms for r in reports)
    torch.testing.assert_close(image, alone_image(3), **CLOSE)
    assert s.active_jobs() == 0


async def test_eight_concurrent_jobs_share_steps_and_equal_their_alone_results(scheduler_factory):
    metrics = Metrics()
    s = await scheduler_factory(max_batch_delay=60.0, metrics=metrics)
    images = await asyncio.wait_for(asyncio.gather(*(run_job(s, seed) for seed in range(8))), 60)
    for seed, image in enumerate(images):
        torch.testing.assert_close(image, alone_image(seed), **CLOSE)
    hist = metrics.registry.get_sample_value
    steps = hist("convlens_optimization_steps_total", {"model": "tiny", "rpc": "MaximizeUnit"})
    batches = hist("convlens_step_batch_size_count", {"model": "tiny", "rpc": "MaximizeUnit"})
    jobs_per_step = hist("convlens_step_batch_size_sum", {"model": "tiny", "rpc": "MaximizeUnit"})
    assert steps == 48
    assert jobs_per_step / batches > 4  # mostly batched (the first steps may start apart)
    assert hist("convlens_time_to_first_progress_seconds_count", {"rpc": "MaximizeUnit"}) == 8
    assert hist("convlens_active_jobs", {"rpc": "MaximizeUnit"}) == 0


async def test_jobs_join_and_leave_mid_run(scheduler_factory):
    s = await scheduler_factory(max_batch_delay=60.0)
    long_reports: list = []
    started = asyncio.Event()
    long = asyncio.create_task(run_job(s, seed=1, steps=40, reports=long_reports, started=started))
    await started.wait()
    short = await asyncio.wait_for(run_job(s, seed=2, steps=5), 30)  # joins, then leaves first
    assert not long.done() and len(long_reports) < 40
    later = await asyncio.wait_for(run_job(s, seed=4, steps=3), 30)  # joins after the first one left
    long_image = await asyncio.wait_for(long, 60)
    torch.testing.assert_close(short, alone_image(2, 5), **CLOSE)
    torch.testing.assert_close(later, alone_image(4, 3), **CLOSE)
    torch.testing.assert_close(long_image, alone_image(1, 40), **CLOSE)


async def start_and_cancel(s: Scheduler, seeds: list[int], created: list) -> None:
    """Start jobs, cancel them once each has stepped (as grpc.aio cancels a handler whose caller left)."""
    started = [asyncio.Event() for _ in seeds]
    tasks = [asyncio.create_task(run_job(s, seed=seed, steps=10_000, started=e, created=created))
             for seed, e in zip(seeds, started, strict=True)]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 30)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_cancelled_jobs_leave_and_free_their_state(scheduler_factory):
    metrics = Metrics()
    s = await scheduler_factory(metrics=metrics)
    survivor = asyncio.create_task(run_job(s, seed=9, steps=400))
    created: list = []
    for round_ in range(10):
        await start_and_cancel(s, [100 + 5 * round_ + i for i in range(5)], created)
    assert len(created) == 50
    await wait_until(lambda: s.active_jobs() == 1)  # only the survivor

    def all_freed() -> bool:  # a step the worker had already taken finishes first, then drops its references
        gc.collect()
        return all(r() is None for r in created)

    await wait_until(all_freed, timeout=30)  # every cancelled job (its tensors, its optimiser state) is gone
    survivor.cancel()
    await asyncio.gather(survivor, return_exceptions=True)
    await wait_until(lambda: s.active_jobs() == 0)
    assert metrics.registry.get_sample_value("convlens_active_jobs", {"rpc": "MaximizeUnit"}) == 0
    assert s.queue_depth() == 0


async def test_max_jobs_refuses_with_resource_exhausted_and_steps_ignore_max_queue(scheduler_factory):
    s = await scheduler_factory(max_queue=1, max_jobs=3)
    started = [asyncio.Event() for _ in range(3)]
    tasks = [asyncio.create_task(run_job(s, seed=i, steps=30, started=e)) for i, e in enumerate(started)]
    await asyncio.gather(*(e.wait() for e in started))
    with pytest.raises(ResourceExhausted, match="max_jobs=3"):
        async with s.job(model="tiny", rpc="MaximizeUnit", deadline=None):
            pass
    images = await asyncio.wait_for(asyncio.gather(*tasks), 60)  # three queued steps > max_queue = 1
    assert len(images) == 3 and s.active_jobs() == 0
    await asyncio.wait_for(run_job(s, seed=5, steps=2), 20)  # admitted again once they finished


async def test_deadline_bounds_the_whole_job(scheduler_factory):
    s = await scheduler_factory()
    loop = asyncio.get_running_loop()
    reports: list = []
    with pytest.raises(DeadlineExceeded):
        await asyncio.wait_for(run_job(s, seed=1, steps=100_000, reports=reports, deadline=loop.time() + 0.5), 30)
    assert 0 < len(reports) < 100_000
    assert s.active_jobs() == 0


async def test_fair_beside_one_shot_work_both_ways(scheduler_factory):
    """Optimisations and one-shot tasks of the same model interleave: neither starves the other."""
    s = await scheduler_factory(max_batch_size=4, max_batch_delay=0.001, max_queue=1000)
    recorder = Recorder(delay=0.002)
    progress: list = []
    jobs = [asyncio.create_task(run_job(s, seed=i, steps=10_000, reports=progress)) for i in range(4)]
    await wait_until(lambda: len(progress) > 0)
    # One-shot work under a flood of optimisation steps: all of it completes while the jobs still run.
    one_shot = [Task(model="tiny", rpc="Saliency", key="k", payload=i, compute=recorder) for i in range(40)]
    results = await asyncio.wait_for(asyncio.gather(*(s.submit(t) for t in one_shot)), 30)
    assert results == [10 * i for i in range(40)] and not any(j.done() for j in jobs)
    # The reverse: a flood of one-shot tasks does not stop the jobs' steps.
    before = len(progress)
    flood = [asyncio.create_task(s.submit(Task(model="tiny", rpc="Saliency", key="k", payload=i,
                                                compute=Recorder(delay=0.02))))
             for i in range(400)]
    await wait_until(lambda: len(progress) >= before + 40, timeout=30)  # ten steps of each job
    assert sum(f.done() for f in flood) < 400  # the jobs moved while the flood was still queued
    for j in jobs:
        j.cancel()
    await asyncio.gather(*jobs, return_exceptions=True)
    await asyncio.wait_for(asyncio.gather(*flood), 60)


def test_pinned_steps_go_only_to_their_device_and_wait_for_their_quorum():
    batcher = Batcher(Metrics(), max_queue=1)
    live = {"n": 2}
    loop = asyncio.new_event_loop()
    try:
        def step(payload: int) -> Entry:
            task = Task(model="m", rpc="MaximizeUnit", key="k", payload=payload, compute=lambda m, p: p,
                        device="cuda:1", quorum=lambda: live["n"])
            return Entry(task, loop.create_future(), 0.0)

        policy = BatchPolicy(8, 60.0)
        first = step(1)
        batcher.put(first)
        batcher.put(step(2))  # a step is never refused by max_queue = 1
        live["n"] = 3
        assert batcher.take(policy, 0.0, "cuda:1")[0] == []  # 2 of 3 live jobs: wait, no timer
        live["n"] = 2  # a job left
        assert batcher.take(policy, 0.0, "cuda:0")[0] == []  # not this device's
        batch, _ = batcher.take(policy, 0.0, "cuda:1")
        assert [e.task.payload for e in batch] == [1, 2]
    finally:
        loop.close()


async def test_a_job_whose_caller_stops_taking_reports_pauses_and_does_not_hold_its_companions(scheduler_factory):
    """#15, slow reader: a job steps only when its caller takes its reports; while it waits for its caller its
    step group goes on without it (before, a companion of the same key waited for it until its deadline)."""
    s = await scheduler_factory(max_batch_delay=60.0)
    async with s.job(model="tiny", rpc="MaximizeUnit", deadline=None) as handle:
        job = make_job(1, handle.device, steps=50)
        reports = handle.steps(job)
        assert (await reports.__anext__()).step == 1  # then its caller takes nothing more for a while
        await wait_until(lambda: s.waiting_jobs() == 1, timeout=30)
        image = await asyncio.wait_for(run_job(s, seed=2), 30)  # same key: batched with nobody, waits for nobody
        torch.testing.assert_close(image, alone_image(2), **CLOSE)
        assert s.waiting_jobs() == 1 and job.step == 1  # paused: no step without its caller
        assert (await reports.__anext__()).step == 2 and s.waiting_jobs() == 0  # the caller is back
        await reports.aclose()
    assert s.active_jobs() == 0 and s.waiting_jobs() == 0 and s.queue_depth() == 0
