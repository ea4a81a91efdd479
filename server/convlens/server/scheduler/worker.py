"""One worker per device: compute threads ("lanes") that each run one batch at a time on their own replicas.

The loop side (`_dispatch`, a coroutine) takes a batch from the batcher whenever a lane is free and hands it
to that lane's thread; the outcome comes back through a future and is settled on the loop. Torch releases
the GIL while it computes, so the asyncio server stays responsive.

A GPU, or a CPU with one shard, has one lane. A CPU with `policy.shards` > 1 has the device lane (every
intra-op thread) and one lane per shard, each with its share (scheduler/shards.py says why that is faster).
When every shard is free a batch is split between them; when one is free it takes a batch of its share of
max_batch_size on its own, without waiting for the others (no barrier between halves). The device lane runs
what must not be split or copied — a task that is alone, so a lone caller gets every thread, and models whose
module cannot be copied per shard (ONNX) — and never while a shard computes, nor the reverse.

A lane whose thread dies (shards.LaneDied: a SystemExit or the like escaped a compute) is replaced at once by a
fresh thread whose replicas are made anew; the callers whose batch it had get UNAVAILABLE (retryable), the
queue is untouched and the next batch runs on the new lane (`convlens_worker_lane_restarts_total`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import replace
from typing import Any

import torch

from convlens.server.engine.interrupt import stop_when, stopped
from convlens.server.errors import ConvLensError, Unavailable
from convlens.server.metrics import Metrics
from convlens.server.models.model import ServedModel
from convlens.server.scheduler.admission import ServiceTimes
from convlens.server.scheduler.batcher import Batcher, Entry
from convlens.server.scheduler.contention import Contention
from convlens.server.scheduler.memory import (
    TRIM_AFTER_S,
    TRIM_IDLE_S,
    compute_splitting,
    injected_faults,
    lane_death,
    stop_condition,
    trim_memory,
    with_faults,
)
from convlens.server.scheduler.policy import BatchPolicy, memory_format_for
from convlens.server.scheduler.shards import (
    LaneDied,
    Shard,
    process_default_threads,
    set_process_default_threads,
    split,
    threads_per_shard,
)
from convlens.server.scheduler.task import Task

# (entry, error or None, result): what a lane sends back for one task.
Outcome = tuple[Entry, BaseException | None, Any]
WHOLE = 0  # the device lane's index
log = logging.getLogger("convlens.scheduler")


class Worker:
    def __init__(self, device: torch.device, policy: BatchPolicy, batcher: Batcher,
                 models: Callable[[str], ServedModel], metrics: Metrics, threads: int | None = None, *,
                 times: ServiceTimes | None = None, lone_all_threads: bool = False,
                 fold_batchnorm: bool = False) -> None:
        self.device = device
        self.policy = policy
        # Intra-op threads of this worker's compute on a CPU (split between its shards, all of them on the
        # device lane); default: the constructing thread's count.
        self.threads = threads or torch.get_num_threads()
        self._shard_count = policy.shards if device.type == "cpu" else 1
        self._lone_all_threads = lone_all_threads  # a lone task on the device lane (see _on_device_lane)
        self._fold_batchnorm = fold_batchnorm  # replicas offer a BN-folded copy (models/fold.py)
        self._alone = False  # the last batch had one task, ran alone, and nothing arrived while it computed
        self._ran = False  # some batch has finished (before that, a lone task is taken as alone)
        self._batcher = batcher
        self._models = models
        self._metrics = metrics
        self._label = str(device)
        self._times = times  # recent compute time per batch, for deadline-aware admission
        self._contention = Contention()  # a lone task takes every thread only while the CPUs are not contended
        self._faults = injected_faults()  # test-only (scheduler/memory.py); {} in production
        self._maybe_die = lane_death(self._faults)  # test-only: None in production
        # lane name -> the model copies whose `lane_replicas` hold that lane's replica (dropped on a restart)
        self._homes: dict[str, list[weakref.ref[ServedModel]]] = {}
        self._trim_due = False  # a long batch ran since the last malloc_trim (set on a lane, read on the loop)
        self._trim_timer: asyncio.TimerHandle | None = None
        self._lanes: list[Shard] = []  # [device lane, *shard lanes]; made in start()
        self._busy: dict[int, list[Entry]] = {}  # lane index -> the entries it computes
        self._held: list[Entry] | None = None  # taken for the device lane, waiting for the shards to finish
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._changed: asyncio.Event | None = None

    @property
    def lanes(self) -> int:
        """Lanes that compute side by side (the shards; one on a GPU or with one shard)."""
        return self._shard_count

    @property
    def busy(self) -> bool:
        return bool(self._busy) or self._held is not None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._lanes = self._make_lanes()
        self._changed = self._batcher.listen()
        self._dispatcher = self._loop.create_task(self._dispatch(), name=f"convlens-dispatch-{self.device}")

    def _make_lanes(self) -> list[Shard]:
        """Started lanes: the device lane, then one per shard (a CPU with shards)."""
        count = 1 if self.device.type == "cuda" or self._shard_count <= 1 else 1 + self._shard_count
        lanes = [self._new_lane(i) for i in range(count)]
        self._start_lanes(lanes)
        return lanes

    def _new_lane(self, index: int) -> Shard:
        """Lane `index` (WHOLE: the device lane, every intra-op thread; i > 0: shard i - 1), not started."""
        self._homes[self._lane_name(index)] = []
        if self.device.type == "cuda":  # ops without a device run on this worker's
            return Shard(f"convlens-worker-{self.device}", None, setup=lambda: torch.cuda.set_device(self.device))
        if index == WHOLE:
            return Shard(f"convlens-worker-{self.device}", self.threads)
        return Shard(f"convlens-shard-{self.device}-{index - 1}", threads_per_shard(self._shard_count, self.threads))

    def _start_lanes(self, lanes: list[Shard]) -> None:
        """On a CPU each lane pins its thread count, and the process-wide value (which pinning changes) is put
        back as it was: threads that start torch later get what they got before."""
        default = process_default_threads() if self.device.type == "cpu" else None
        try:
            for lane in lanes:
                lane.start()
        finally:
            if default is not None:
                set_process_default_threads(default)

    @staticmethod
    def _lane_name(index: int) -> str:
        return "device" if index == WHOLE else f"shard{index - 1}"

    def _restart(self, index: int, why: BaseException | None) -> None:
        """On the loop: lane `index`'s thread is gone; put a fresh one (and fresh replicas) in its place."""
        name = self._lane_name(index)
        for ref in self._homes.get(name, []):  # the dead lane's replicas: never used again
            model = ref()
            if model is not None:
                model.lane_replicas.pop(f"{self._label}/{name}", None)
        lane = self._new_lane(index)
        try:
            self._start_lanes([lane])
        except RuntimeError:  # it could not even start: the dead one stays, its next batch tries again
            log.exception("worker %s: lane %s could not be restarted", self._label, name)
            return
        self._lanes[index] = lane
        self._metrics.lane_restarts.labels(device=self._label, lane=name).inc()
        log.error("worker %s: lane %s's thread died (%s); its batch was answered UNAVAILABLE and a fresh "
                  "thread took its place", self._label, name, why)

    async def warm(self, models: Sequence[ServedModel]) -> None:
        """Make every lane's replicas of `models` now and run each once (a forward and a gradient to the input at
        the model's input size, batch 1), on the lanes' own threads: done at start-up, before SERVING, so that
        the first callers do not wait for the copies, the layout conversion and the kernels' first-use setup
        (issue #15: the first calls on a fresh Lite0 server took seconds, refusals included). A model that
        fails here is logged and left to fail its calls as it would have."""
        assert self._loop is not None, "start() first"
        waits = []
        for index, lane in enumerate(self._lanes):
            if len(self._lanes) == 1:
                chosen = list(models)
            elif index == WHOLE:  # with shards, the device lane runs ONNX (and lone tasks if asked to)
                chosen = [m for m in models if not m.layout_applies or self._lone_all_threads]
            else:  # shards never run ONNX
                chosen = [m for m in models if m.layout_applies]
            if chosen:
                waits.append(asyncio.wrap_future(lane.submit(
                    lambda lane=lane, index=index, chosen=chosen: self._warm_lane(chosen, lane, index)),
                    loop=self._loop))
        await asyncio.gather(*waits)

    def _warm_lane(self, models: Sequence[ServedModel], lane: Shard, index: int) -> None:
        name = self._lane_name(index)
        for model in models:
            try:
                replica = self._replica_of(model, model.name, lane.replicas, index != WHOLE, name)
                pre = model.preprocess
                x = replica.batch([torch.zeros(3, pre.height, pre.width)])
                if model.supports_gradients:
                    x.requires_grad_(True)
                    torch.autograd.grad(replica.module(x).sum(), x)
                else:
                    with torch.no_grad():
                        replica.module(x)
            except Exception:  # its calls will report it; start-up goes on
                log.exception("worker %s: warming %s on lane %s failed", self._label, model.name, name)

    async def close(self, error: Callable[[], ConvLensError]) -> None:
        """Stop taking batches; fail what is still computing with `error()` (its result will be ignored)."""
        if self._trim_timer is not None:
            self._trim_timer.cancel()
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            await asyncio.gather(self._dispatcher, return_exceptions=True)
        for entries in [*self._busy.values(), self._held or []]:
            for entry in entries:
                if not entry.future.done():
                    entry.future.set_exception(error())
        stuck = bool(self._busy)
        self._busy, self._held = {}, None
        for lane in self._lanes:
            lane.stop()  # each lane's thread exits after its current batch, if any
        if not stuck:
            for lane in self._lanes:
                await asyncio.to_thread(lane.join, 5.0)

    # ---- the loop side ----

    async def _dispatch(self) -> None:
        assert self._changed is not None
        changed = self._changed
        while True:
            changed.clear()  # before take(): a put after it sets the event again, so no wake-up is lost
            free = self._free_lanes()
            if not free:
                await changed.wait()
                continue
            batch, wait = self._batcher.take(self._policy_now(len(free)), time.monotonic(), self._label)
            if not batch:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation that arrives as
                # the event is set (gh-86296), and close() would then wait for a dispatcher that never ends.
                try:
                    async with asyncio.timeout(wait):
                        await changed.wait()
                except TimeoutError:
                    pass
                continue
            if len(self._lanes) == 1:
                self._launch(WHOLE, batch, len(batch))
            elif self._on_device_lane(batch, len(free)):
                if self._busy:  # an ONNX batch while shards compute: it waits for them, not they for it
                    self._held = batch
                    while self._busy:
                        changed.clear()
                        await changed.wait()
                    self._held = None
                self._launch(WHOLE, batch, len(batch))
            else:
                for lane, chunk in zip(free, split(batch, len(free)), strict=False):
                    self._launch(lane, list(chunk), len(batch))
            # (#15, streams) The lanes hold the batch now: the loop must not keep it (and its jobs) alive while
            # it waits for the next one.
            batch = chunk = []

    def _free_lanes(self) -> list[int]:
        if len(self._lanes) == 1:
            return [] if self._busy else [WHOLE]
        if WHOLE in self._busy:
            return []
        return [i for i in range(1, len(self._lanes)) if i not in self._busy]

    def _share(self) -> int:
        """One shard's part of max_batch_size."""
        return max(1, math.ceil(self.policy.max_batch_size / self._shard_count))

    def _policy_now(self, free: int) -> BatchPolicy:
        """The policy for the next take: up to one share per free shard (the whole size on one lane). Waiting
        max_batch_delay only pays when companions are likely: when the last batch ran alone and nobody
        arrived while it computed (one caller at a time), a lone task runs at once. Measured on the busy
        2-core CPU, the 2 ms timed wait cost a lone caller 15% (11.2-11.8 vs 13.3-13.7 requests/s with
        batching off): the loop must be woken by a timer on a contended machine."""
        size = self.policy.max_batch_size if len(self._lanes) == 1 else self._share() * free
        alone = self._alone and self._batcher.depth <= 1
        return BatchPolicy(size, 0.0 if alone else self.policy.max_batch_delay)

    def _on_device_lane(self, batch: list[Entry], free: int) -> bool:
        """A model whose module cannot be copied per shard (ONNX: hooks on a shared module would fire in both
        shards' forwards), and with `lone_all_threads` a lone task when every shard is free (all threads for
        one caller: faster on a quiet dedicated host, a collapse when the cores are shared, so off by default)
        while the CPUs are not contended (scheduler/contention.py: even a dedicated host is busy at times).

        Never an optimisation step (a task with a quorum): its job's float sums must run in the same order
        whatever its companions, and the intra-op thread count changes that order (a 2-thread team splits
        reductions differently). One ulp at one step grows over an optimisation's steps: the same
        MaximizeUnit job on 1 and 2 threads ended 2.3 grey levels apart on average after 32 steps, and a job
        that ran alone for some steps and batched for others 14.7 apart (docs/performance.md). On
        single-threaded shards a job's steps are bit-identical alone or in any batch."""
        step = batch[0].task.quorum is not None
        if (self._lone_all_threads and not step and len(batch) == 1 and free == len(self._lanes) - 1
                and (self._alone or not self._ran) and (self.threads <= 1 or not self._contention.busy())):
            return True
        try:
            return not self._model_of(batch[0].task).layout_applies
        except Exception:  # a model that went away: the device lane reports it as the compute would
            return True

    def _launch(self, lane: int, entries: list[Entry], batch_size: int) -> None:
        assert self._loop is not None
        self._busy[lane] = entries
        shard = self._lanes[lane]
        fresh = lane != WHOLE  # shards compute side by side: each needs a module of its own
        lane_name = self._lane_name(lane)
        done: Future[list[Outcome]] = shard.submit(lambda: self._run(entries, shard.replicas, fresh, lane_name))
        asyncio.wrap_future(done, loop=self._loop).add_done_callback(
            lambda f: self._finished(lane, entries, batch_size, f))

    def _finished(self, lane: int, entries: list[Entry], batch_size: int, f: asyncio.Future[list[Outcome]]
                  ) -> None:
        """On the loop: the lane is free again; deliver results (futures already done — cancelled, or failed
        by stop — are skipped). The dispatcher is woken first: callbacks run in the order they are scheduled,
        so the next batch starts before the callers' handlers encode their responses."""
        self._busy.pop(lane, None)
        exc = None if f.cancelled() else f.exception()
        outcomes: list[Outcome]
        if isinstance(exc, LaneDied):  # the lane's thread is gone: a fresh one before the next batch
            self._restart(lane, exc)
            outcomes = [(e, Unavailable(f"the compute thread running this call on {self._label} died and was "
                                        "replaced; retry (here or on another instance)"),
                         None) for e in entries]
        elif f.cancelled() or exc is not None:  # _run catches compute errors: this is a bug in the lane's code
            outcomes = [(e, RuntimeError(f"worker {self.device} failed: {exc!r}"), None) for e in entries]
        else:
            outcomes = f.result()
        self._alone = batch_size == 1 and not self._busy and self._batcher.depth == 0
        self._ran = True
        if self._trim_due:
            self._trim_later()
        if self._changed is not None:
            self._changed.set()
        for entry, error, result in outcomes:
            if entry.future.done():
                continue
            if error is not None:
                entry.future.set_exception(error)
            else:
                entry.future.set_result(result)

    # ---- a lane's thread ----

    def _run(self, batch: list[Entry], replicas: dict[str, ServedModel], fresh: bool, lane: str
             ) -> list[Outcome]:
        """On a lane's thread: compute the live entries of `batch` on that lane's replica."""
        live = []
        for entry in batch:
            if entry.cancelled:  # the caller went away between take() and now: never compute it
                self._metrics.rejections.labels(model=entry.task.model, rpc=entry.task.rpc,
                                                reason=entry.task.gone_reason(time.monotonic())).inc()
            else:
                live.append(entry)
        if not live:
            return []
        if self._maybe_die is not None:  # test-only (CONVLENS_TEST_FAULTS=lane_dies=N)
            self._maybe_die()
        task = live[0].task  # every task of a batch shares model, rpc, key, hence compute
        start = time.monotonic()
        for entry in live:
            self._metrics.queue_wait_seconds.labels(model=task.model, rpc=task.rpc).observe(
                start - entry.enqueued)
        outcomes: list[Outcome]
        gone = False
        try:
            # The engine stops between chunks once every caller of the batch is gone (scheduler/memory.py).
            with stop_when(stop_condition(live)):
                results = compute_splitting(with_faults(task.compute, self._faults),
                                            self._replica(task, replicas, fresh, lane),
                                            [e.task.payload for e in live], f"{task.rpc} request")
            if len(results) != len(live):
                raise RuntimeError(f"compute for {task.rpc} on {task.model!r} returned {len(results)} "
                                   f"results for {len(live)} payloads")
            outcomes = [(e, r if isinstance(r, Exception) else None, r)
                        for e, r in zip(live, results, strict=True)]
        except Exception as exc:  # the whole batch fails; the worker goes on
            outcomes = [(e, exc, None) for e in live]
            if stopped(exc):  # nobody waits for these results any more (engine/interrupt.py)
                gone = True
                self._metrics.compute_stopped.labels(model=task.model, rpc=task.rpc).inc(len(live))
        elapsed = time.monotonic() - start
        if elapsed >= TRIM_AFTER_S:  # a long batch likely freed large buffers: trimmed once idle (issue #15)
            self._trim_due = True
        labels = dict(device=self._label, model=task.model, rpc=task.rpc)
        self._metrics.batch_size.labels(**labels).observe(len(live))
        self._metrics.compute_seconds.labels(**labels).observe(elapsed)
        self._metrics.tasks.labels(**labels).inc(len(live))
        self._metrics.worker_busy_seconds.labels(device=self._label, lane=lane).inc(elapsed)
        if self._times is not None and task.quorum is None and not gone:  # a stopped batch's time is no estimate
            self._times.record(task.model, task.rpc, elapsed)
        return outcomes

    def _trim_later(self) -> None:
        """After a long batch, give freed memory back once the worker has been idle for TRIM_IDLE_S (not after
        every batch: between an optimisation's steps the pages would only be faulted back in)."""
        assert self._loop is not None
        if self._trim_timer is not None:
            self._trim_timer.cancel()
        self._trim_timer = self._loop.call_later(TRIM_IDLE_S, self._trim_if_idle)

    def _trim_if_idle(self) -> None:
        self._trim_timer = None
        if self._busy or self._held is not None or self._batcher.depth:
            self._trim_later()
            return
        self._trim_due = False
        assert self._loop is not None
        self._loop.run_in_executor(None, self._trim)

    def _trim(self) -> None:
        freed = trim_memory()
        if freed is not None:
            self._metrics.memory_trims.inc()
            self._metrics.memory_trimmed_bytes.inc(freed)

    def _model_of(self, task: Task) -> ServedModel:
        """The copy `task` runs on: the one it was submitted with, else the one its model name serves now."""
        return task.served if task.served is not None else self._models(task.model)

    def _replica(self, task: Task, replicas: dict[str, ServedModel], fresh: bool, lane: str) -> ServedModel:
        return self._replica_of(self._model_of(task), task.model, replicas, fresh, lane)

    def _replica_of(self, model: ServedModel, name: str, replicas: dict[str, ServedModel], fresh: bool, lane: str
                    ) -> ServedModel:
        """The lane's replica of a model copy, made on the lane's thread (at start-up by `warm`, else lazily, so
        that a slow copy to a GPU never blocks the loop); `fresh`: a module of its own even when the layout is
        unchanged (for hooks). Replicas are kept by the copy itself (`lane_replicas`), so they go when the copy
        goes (an unloaded or reloaded model); a stand-in without that cache uses the lane's, by `name`."""
        cache = getattr(model, "lane_replicas", None)
        cache, key = (replicas, name) if cache is None else (cache, f"{self._label}/{lane}")
        replica = cache.get(key)
        if replica is None:
            replica = model.replica(self.device, memory_format=memory_format_for(self.device), fresh=fresh)
            if self._fold_batchnorm:  # (shares the replica's module; its `folded` is a copy of its own)
                replica = replace(replica, fold_batchnorm=True, lane_replicas={})
            if replica is not model:  # (the copy itself is not cached on itself: no reference cycle)
                cache[key] = replica
                if cache is not replicas:  # remembered so that a restart of this lane can drop it
                    homes = self._homes.setdefault(lane, [])
                    homes[:] = [r for r in homes if r() is not None]
                    homes.append(weakref.ref(model))
        return replica
