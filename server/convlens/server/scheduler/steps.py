"""The step scheduler: iteration-level batching of optimisations (MaximizeUnit, Dream, StyleTransfer).

A job is admitted once (`Scheduler.job(...)`, refused with RESOURCE_EXHAUSTED beyond --max-jobs), placed
on the device with the fewest live jobs, and keeps its state there. Each of its steps is then a task of
the ordinary batcher, pinned to that device and keyed by what can share one forward/backward (the job's
`key`: input size and layers read; not the target). A step group is ready as soon as every live job of
its key on that device has its step queued (or max_batch_size of them): a lone job never waits
max_batch_delay, and jobs join and leave between steps, as in Orca. Step tasks are never refused by
max_queue — a running job always gets its next step — and they compete with one-shot work in the batcher's
fair order (round robin over models, oldest group first).

Usage from a service (the async side; `job` implements engine.optimize.job.Job):

    async with scheduler.job(model=name, rpc="MaximizeUnit", deadline=deadline) as handle:
        job = build_job(handle.device)          # its tensors on handle.device
        async for report in handle.steps(job):  # one StepReport per step, until job.done
            ...                                 # progress events
        final = await handle.submit(key, payload, compute)  # a one-shot task pinned to the device

Leaving the block — normally, by an error, or because the caller went away (CancelledError) — releases the
job's slot at once: its queued step is discarded, its companions stop waiting for it, and the job's
tensors are freed when the service drops it. The deadline bounds the whole job: a step not started by then
fails with DEADLINE_EXCEEDED.

A job is stepped only when its caller takes its events: `steps` yields each report and submits the next step
when asked for it. A caller that stops reading (grpc's flow-control window full, so the write of its event
blocks) therefore pauses its job — no compute, nothing more buffered — until it reads again, its deadline
passes or it goes away. Its companions must not wait for it meanwhile: a job still in its caller's hands
CALLER_PATIENCE after its step leaves its step group (counted in `JobRegistry.waiting`), and joins again
with its next step. A quick caller never leaves, so batches stay whole.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import torch

from convlens.server.compute.steps import compute_steps
from convlens.server.engine.optimize.job import Job, StepReport
from convlens.server.errors import DeadlineExceeded, ResourceExhausted
from convlens.server.metrics import Metrics
from convlens.server.models.model import ServedModel
from convlens.server.scheduler.task import Compute, Task

Submit = Callable[[Task], Any]  # Scheduler.submit

# Seconds a job's companions wait for it while its caller takes a step's event (a preview rendered, a message
# written) before the group goes on without it. Normally that is well under a millisecond; a reader that
# stopped reading would otherwise hold every job of its step group until its deadline (#15, slow reader).
CALLER_PATIENCE = 0.1


class JobRegistry:
    """Live jobs: admission (--max-jobs), device placement, and the quorum of each step group."""

    def __init__(self, devices: Sequence[torch.device], max_jobs: int, metrics: Metrics,
                 changed: Callable[[], None]) -> None:
        if max_jobs < 1:
            raise ValueError(f"max_jobs must be >= 1, got {max_jobs}")
        self.max_jobs = max_jobs
        self._devices = [str(d) for d in devices]
        self._metrics = metrics
        self._changed = changed  # wakes the workers: a quorum may have dropped
        self._per_device: Counter[str] = Counter()
        self._per_group: Counter[Hashable] = Counter()
        self._per_rpc: Counter[str] = Counter()
        self.waiting = 0  # live jobs out of their step group because their caller is slow to take an event

    @property
    def live(self) -> int:
        return sum(self._per_device.values())

    @property
    def groups(self) -> int:
        """Step groups with at least one live job in them."""
        return len(self._per_group)

    def admit(self, model: str, rpc: str) -> str:
        if self.live >= self.max_jobs:
            self._metrics.rejections.labels(model=model, rpc=rpc, reason="max_jobs").inc()
            raise ResourceExhausted(f"server busy: {self.live} optimisation jobs running (max_jobs="
                                    f"{self.max_jobs}); retry with backoff", reason="TOO_MANY_JOBS")
        device = min(self._devices, key=lambda d: (self._per_device[d], self._devices.index(d)))
        self._per_device[device] += 1
        self._per_rpc[rpc] += 1
        self._metrics.active_jobs.labels(rpc=rpc).set(self._per_rpc[rpc])
        return device

    def release(self, device: str, rpc: str) -> None:
        self._per_device[device] -= 1
        self._per_rpc[rpc] -= 1
        self._metrics.active_jobs.labels(rpc=rpc).set(self._per_rpc[rpc])

    def join(self, group: Hashable) -> None:
        self._per_group[group] += 1
        self._changed()

    def leave(self, group: Hashable) -> None:
        self._per_group[group] -= 1
        if self._per_group[group] <= 0:
            del self._per_group[group]
        self._changed()

    def quorum(self, group: Hashable) -> Callable[[], int]:
        return lambda: self._per_group.get(group, 0)


class JobHandle:
    """One admitted job's way to the workers (see the module docstring)."""

    def __init__(self, registry: JobRegistry, submit: Submit, metrics: Metrics, *, model: str, rpc: str,
                 device: str, deadline: float | None, served: ServedModel | None = None) -> None:
        self._registry = registry
        self.served = served  # the model copy every step runs on, even if the model is reloaded meanwhile
        self._submit = submit
        self._metrics = metrics
        self.model, self.rpc, self.deadline = model, rpc, deadline
        self.device = torch.device(device)
        self._device_label = device
        self._group: Hashable | None = None
        self._started = time.monotonic()
        self._first_progress = True
        self._waiting = False  # out of its step group: its caller has not taken the last event yet
        self.cost = 0  # pixels one step works on (set by the service from its budget check; Task.cost)

    def _check_deadline(self) -> None:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self._metrics.rejections.labels(model=self.model, rpc=self.rpc, reason="deadline").inc()
            raise DeadlineExceeded(f"deadline passed after {time.monotonic() - self._started:.1f}s of the "
                                   "optimisation; ask for fewer steps, a smaller size, or a longer deadline")

    def _enter(self, key: Hashable) -> Hashable:
        self._caller_back()
        group = (self.model, self.rpc, key, self._device_label, self.served.copy_id if self.served else None)
        if group != self._group:  # a job's key may change between steps (Dream's octaves change the size)
            self._leave()
            self._registry.join(group)
            self._group = group
        return group

    def _leave(self) -> None:
        if self._group is not None:
            self._registry.leave(self._group)
            self._group = None

    def _caller_slow(self) -> None:
        """The caller has not taken the last event after CALLER_PATIENCE: companions go on without this job."""
        if self._group is not None and not self._waiting:
            self._leave()
            self._waiting = True
            self._registry.waiting += 1
            self._metrics.jobs_waiting.set(self._registry.waiting)

    def _caller_back(self) -> None:
        if self._waiting:
            self._waiting = False
            self._registry.waiting -= 1
            self._metrics.jobs_waiting.set(self._registry.waiting)

    async def step(self, job: Job) -> StepReport:
        """One step of `job`, batched with the other live jobs of its key on this device."""
        self._check_deadline()
        group = self._enter(job.key)
        task = Task(model=self.model, rpc=self.rpc, key=job.key, payload=job, compute=compute_steps,
                    deadline=self.deadline, device=self._device_label, quorum=self._registry.quorum(group),
                    served=self.served, cost=self.cost)
        report, batch = await self._submit(task)
        self._metrics.steps.labels(model=self.model, rpc=self.rpc).inc()
        self._metrics.step_batch_size.labels(model=self.model, rpc=self.rpc).observe(batch)
        if self._first_progress:
            self._first_progress = False
            self._metrics.first_progress_seconds.labels(rpc=self.rpc).observe(time.monotonic() - self._started)
        return report  # type: ignore[no-any-return]

    async def steps(self, job: Job) -> AsyncIterator[StepReport]:
        """Step until `job.done`, yielding each step's report; the next step is submitted when the caller
        asks for it (see the module docstring: a slow caller's companions go on without it)."""
        loop = asyncio.get_running_loop()
        while not job.done:
            report = await self.step(job)
            if job.done:
                self._leave()  # no companion waits for a finished job
                yield report
                return
            timer = loop.call_later(CALLER_PATIENCE, self._caller_slow)
            try:
                yield report
            finally:
                timer.cancel()

    async def submit(self, key: Hashable, payload: Any, compute: Compute) -> Any:
        """A one-shot task on this job's device (e.g. scoring the final image), batched by `key`."""
        self._check_deadline()
        self._leave()
        return await self._submit(Task(model=self.model, rpc=self.rpc, key=key, payload=payload,
                                       compute=compute, deadline=self.deadline, device=self._device_label,
                                       served=self.served))


@asynccontextmanager
async def job_slot(registry: JobRegistry, submit: Submit, metrics: Metrics, *, model: str, rpc: str,
                   deadline: float | None, served: ServedModel | None = None) -> AsyncIterator[JobHandle]:
    device = registry.admit(model, rpc)
    handle = JobHandle(registry, submit, metrics, model=model, rpc=rpc, device=device, deadline=deadline,
                       served=served)
    try:
        yield handle
    finally:
        handle._leave()
        handle._caller_back()
        registry.release(device, rpc)
