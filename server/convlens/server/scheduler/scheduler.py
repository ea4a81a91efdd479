"""The scheduler facade the transport calls: submit a Task, get its result (or a domain error)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

import torch

from convlens.server.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from convlens.server.metrics import Metrics
from convlens.server.models.model import ServedModel
from convlens.server.scheduler.admission import ServiceTimes, estimated_wait
from convlens.server.scheduler.batcher import Batcher, Entry
from convlens.server.scheduler.policy import BatchPolicy, policies_for
from convlens.server.scheduler.steps import JobHandle, JobRegistry, job_slot
from convlens.server.scheduler.task import Task
from convlens.server.scheduler.worker import Worker


class Scheduler:
    """One shared queue of batch groups; one worker per device pulls the next ready group when free.

    Metrics: queue_depth is one gauge with device="all" (the queue is shared by every device);
    batch_size, compute_seconds, tasks_total, worker_busy_seconds are per device; queue_wait_seconds is
    per task; rejections_total counts reasons "queue_full", "deadline", "deadline_unmeetable" (refused at
    submit: scheduler/admission.py), "cancelled", "stopping".
    """

    def __init__(self, models: Callable[[str], ServedModel], devices: Sequence[torch.device],
                 metrics: Metrics, *, policies: Mapping[str, BatchPolicy] | None = None,
                 max_queue: int = 256, max_jobs: int = 64, threads: int | None = None,
                 lone_all_threads: bool = False, fold_batchnorm: bool = False) -> None:
        devices = list(devices)
        if not devices:
            raise ValueError("the scheduler needs at least one device")
        self._metrics = metrics
        self._batcher = Batcher(metrics, max_queue)
        per_device = policies_for(devices, policies)
        self._times = ServiceTimes()
        self._workers = [Worker(d, per_device[str(d)], self._batcher, models, metrics, threads, times=self._times,
                                lone_all_threads=lone_all_threads, fold_batchnorm=fold_batchnorm)
                         for d in devices]
        self._jobs = JobRegistry(devices, max_jobs, metrics, self._batcher.notify)
        self._state = "new"  # new -> running -> stopping -> stopped
        self._stopped: asyncio.Future[None] | None = None

    async def start(self) -> None:
        if self._state != "new":
            raise RuntimeError(f"scheduler cannot start: it is {self._state}")
        for worker in self._workers:
            worker.start()
        self._state = "running"

    async def warm(self, models: Sequence[ServedModel]) -> None:
        """Every worker's replicas of `models` made and run once now (worker.Worker.warm), before callers come."""
        if self._state != "running":
            raise RuntimeError(f"scheduler cannot warm up: it is {self._state}")
        await asyncio.gather(*(w.warm(models) for w in self._workers))

    def queue_depth(self) -> int:
        return self._batcher.depth

    def active_jobs(self) -> int:
        return self._jobs.live

    def waiting_jobs(self) -> int:
        """Live jobs paused because their caller has not taken their last event (see scheduler/steps.py)."""
        return self._jobs.waiting

    def job(self, *, model: str, rpc: str, deadline: float | None, served: ServedModel | None = None
            ) -> AbstractAsyncContextManager[JobHandle]:
        """Admit an optimisation job (ResourceExhausted beyond max_jobs); see scheduler/steps.py. `served`:
        the model copy its steps run on (kept through reloads)."""
        if self._state != "running":
            raise Unavailable("server is shutting down; retry on another instance"
                              if self._state != "new" else "scheduler not started")
        return job_slot(self._jobs, self.submit, self._metrics, model=model, rpc=rpc, deadline=deadline,
                        served=served)

    async def submit(self, task: Task) -> Any:
        if self._state != "running":
            self._reject(task, "stopping")
            raise Unavailable("server is shutting down; retry on another instance"
                              if self._state != "new" else "scheduler not started")
        now = time.monotonic()
        if task.deadline is not None and task.deadline <= now:
            self._reject(task, "deadline")
            raise DeadlineExceeded("deadline passed before the task was queued")
        if task.deadline is not None and task.quorum is None:
            self._admit_by_deadline(task, now)
        loop = asyncio.get_running_loop()
        entry = Entry(task, loop.create_future(), now)
        self._batcher.put(entry)  # ResourceExhausted at once when full
        # A task still queued at its deadline leaves the queue then, not when its batch would form.
        # (loop.time() is time.monotonic(), the clock deadlines are written in.)
        timer = loop.call_at(task.deadline, self._expire, entry) if task.deadline is not None else None
        try:
            return await entry.future
        except asyncio.CancelledError:
            # The caller went away (grpc.aio cancels the handler). Still queued: remove it so it never
            # counts toward a batch. Already taken: the flag makes the worker skip it if not yet computed.
            entry.cancelled = True
            if self._batcher.discard(entry):
                self._reject(task, task.gone_reason(time.monotonic()))
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def _admit_by_deadline(self, task: Task, now: float) -> None:
        """ResourceExhausted at once when the queue ahead cannot be computed before the task's deadline
        (scheduler/admission.py): the caller can retry elsewhere instead of waiting the deadline out."""
        assert task.deadline is not None
        own = self._times.per_batch(task.model, task.rpc)
        if own is None or not self._batcher.depth:
            return
        lanes = sum(w.lanes for w in self._workers)
        wait = estimated_wait(self._batcher.queued(), self._times,
                              max(1, self._workers[0].policy.max_batch_size // max(1, self._workers[0].lanes)),
                              lanes)
        left = task.deadline - now
        if wait > left:  # the queue ahead alone outlasts the deadline (admission.py: why not its own batch)
            self._reject(task, "deadline_unmeetable")
            retry = max(0.1, wait + own)
            raise ResourceExhausted(
                f"server busy: {self._batcher.depth} tasks queued, about {wait:.2f}s of work ahead of this call "
                f"and {own:.2f}s for it, past its deadline ({max(left, 0):.2f}s left); retry on another instance, "
                f"or here after ~{retry:.1f}s, or with a longer deadline")

    def _expire(self, entry: Entry) -> None:
        if not entry.future.done() and self._batcher.discard(entry):
            self._reject(entry.task, "deadline")
            entry.future.set_exception(DeadlineExceeded("deadline passed while the task was queued"))

    async def stop(self, grace: float) -> None:
        """Refuse new tasks, finish accepted ones within `grace` seconds, fail the rest, stop workers."""
        if self._stopped is not None:  # a second stop waits for the first
            await asyncio.shield(self._stopped)
            return
        self._stopped = asyncio.get_running_loop().create_future()
        started = self._state == "running"
        self._state = "stopping"
        try:
            if started:
                self._batcher.flush()  # nobody waits for companions any more
                end = time.monotonic() + grace
                while (self._batcher.depth or any(w.busy for w in self._workers)) and time.monotonic() < end:
                    await asyncio.sleep(0.005)  # polling is fine here: stop happens once
            self._batcher.drain(lambda: Unavailable("server shut down before this task started; retry"),
                                "stopping")
            for worker in self._workers:
                if started:
                    await worker.close(lambda: Unavailable("server shut down before this task finished; "
                                                           "retry"))
        finally:
            self._state = "stopped"
            self._stopped.set_result(None)

    def _reject(self, task: Task, reason: str) -> None:
        self._metrics.rejections.labels(model=task.model, rpc=task.rpc, reason=reason).inc()
