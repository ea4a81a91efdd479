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
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import replace
from typing import Any

import torch

from convlens.server.errors import ConvLensError
from convlens.server.metrics import Metrics
from convlens.server.models.model import ServedModel
from convlens.server.scheduler.admission import ServiceTimes
from convlens.server.scheduler.batcher import Batcher, Entry
from convlens.server.scheduler.memory import compute_splitting, injected_faults, with_faults
from convlens.server.scheduler.policy import BatchPolicy, memory_format_for
from convlens.server.scheduler.shards import (
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
        self._faults = injected_faults()  # test-only (scheduler/memory.py); {} in production
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
        """Started lanes. On a CPU each pins its thread count, and the process-wide value (which pinning
        changes) is put back as it was: threads that start torch later get what they got before."""
        name = f"convlens-worker-{self.device}"
        if self.device.type == "cuda":
            lane = Shard(name, None, setup=lambda: torch.cuda.set_device(self.device))  # ops without a device
            lane.start()
            return [lane]
        default = process_default_threads()
        lanes = [Shard(name, self.threads)]
        if self._shard_count > 1:
            per = threads_per_shard(self._shard_count, self.threads)
            lanes += [Shard(f"convlens-shard-{self.device}-{i}", per) for i in range(self._shard_count)]
        for lane in lanes:
            lane.start()
        set_process_default_threads(default)
        return lanes

    async def close(self, error: Callable[[], ConvLensError]) -> None:
        """Stop taking batches; fail what is still computing with `error()` (its result will be ignored)."""
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
                try:
                    await asyncio.wait_for(changed.wait(), wait)
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
        one caller: faster on a quiet dedicated host, a collapse when the cores are shared, so off by default).

        Never an optimisation step (a task with a quorum): its job's float sums must run in the same order
        whatever its companions, and the intra-op thread count changes that order (a 2-thread team splits
        reductions differently). One ulp at one step grows over an optimisation's steps: the same
        MaximizeUnit job on 1 and 2 threads ended 2.3 grey levels apart on average after 32 steps, and a job
        that ran alone for some steps and batched for others 14.7 apart (docs/performance.md). On
        single-threaded shards a job's steps are bit-identical alone or in any batch."""
        step = batch[0].task.quorum is not None
        if (self._lone_all_threads and not step and len(batch) == 1 and free == len(self._lanes) - 1
                and (self._alone or not self._ran)):
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
        lane_name = "device" if lane == WHOLE else f"shard{lane - 1}"
        done: Future[list[Outcome]] = shard.submit(lambda: self._run(entries, shard.replicas, fresh, lane_name))
        asyncio.wrap_future(done, loop=self._loop).add_done_callback(
            lambda f: self._finished(lane, entries, batch_size, f))

    def _finished(self, lane: int, entries: list[Entry], batch_size: int, f: asyncio.Future[list[Outcome]]
                  ) -> None:
        """On the loop: the lane is free again; deliver results (futures already done — cancelled, or failed
        by stop — are skipped). The dispatcher is woken first: callbacks run in the order they are scheduled,
        so the next batch starts before the callers' handlers encode their responses."""
        self._busy.pop(lane, None)
        if f.cancelled() or f.exception() is not None:  # _run catches compute errors: this is the lane failing
            exc = None if f.cancelled() else f.exception()
            outcomes: list[Outcome] = [(e, RuntimeError(f"worker {self.device} failed: {exc!r}"), None)
                                       for e in entries]
        else:
            outcomes = f.result()
        self._alone = batch_size == 1 and not self._busy and self._batcher.depth == 0
        self._ran = True
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
        task = live[0].task  # every task of a batch shares model, rpc, key, hence compute
        start = time.monotonic()
        for entry in live:
            self._metrics.queue_wait_seconds.labels(model=task.model, rpc=task.rpc).observe(
                start - entry.enqueued)
        outcomes: list[Outcome]
        try:
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
        elapsed = time.monotonic() - start
        labels = dict(device=self._label, model=task.model, rpc=task.rpc)
        self._metrics.batch_size.labels(**labels).observe(len(live))
        self._metrics.compute_seconds.labels(**labels).observe(elapsed)
        self._metrics.tasks.labels(**labels).inc(len(live))
        self._metrics.worker_busy_seconds.labels(device=self._label, lane=lane).inc(elapsed)
        if self._times is not None and task.quorum is None:
            self._times.record(task.model, task.rpc, elapsed)
        return outcomes

    def _model_of(self, task: Task) -> ServedModel:
        """The copy `task` runs on: the one it was submitted with, else the one its model name serves now."""
        return task.served if task.served is not None else self._models(task.model)

    def _replica(self, task: Task, replicas: dict[str, ServedModel], fresh: bool, lane: str) -> ServedModel:
        """The lane's replica of the task's model copy, made lazily on the lane's thread (so that a slow copy
        to a GPU never blocks the loop); `fresh`: a module of its own even when the layout is unchanged (for
        hooks). Replicas are kept by the copy itself (`lane_replicas`), so they go when the copy goes (an
        unloaded or reloaded model); a stand-in without that cache uses the lane's, by name."""
        model = self._model_of(task)
        cache = getattr(model, "lane_replicas", None)
        cache, key = (replicas, task.model) if cache is None else (cache, f"{self._label}/{lane}")
        replica = cache.get(key)
        if replica is None:
            replica = model.replica(self.device, memory_format=memory_format_for(self.device), fresh=fresh)
            if self._fold_batchnorm:  # (shares the replica's module; its `folded` is a copy of its own)
                replica = replace(replica, fold_batchnorm=True, lane_replicas={})
            if replica is not model:  # (the copy itself is not cached on itself: no reference cycle)
                cache[key] = replica
        return replica
