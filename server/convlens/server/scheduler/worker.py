"""One worker per device: a dedicated thread that runs one batch at a time on that device's replicas.

The loop side (`_dispatch`, a coroutine) takes a batch from the batcher when the worker is free and hands
it to the thread; the thread computes and settles the tasks' futures back on the loop with
`call_soon_threadsafe`. Torch releases the GIL while it computes, so the asyncio server stays responsive.

On the CPU a worker may split each batch of two or more tasks between `policy.shards` compute threads, each
with its share of the intra-op threads (scheduler/shards.py says why that is faster); a lone task runs on
the worker thread itself with all of them, so a lone caller loses nothing.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from convlens.server.errors import ConvLensError
from convlens.server.metrics import Metrics
from convlens.server.models.model import ServedModel
from convlens.server.scheduler.batcher import Batcher, Entry
from convlens.server.scheduler.policy import BatchPolicy, memory_format_for
from convlens.server.scheduler.shards import (
    Shard,
    pin_intra_op_threads,
    process_default_threads,
    set_process_default_threads,
    split,
)
from convlens.server.scheduler.task import Task

# (entry, error or None, result): what the thread sends back for one task.
Outcome = tuple[Entry, BaseException | None, Any]
Job = tuple[list[Entry], "asyncio.Future[None]"]


class Worker:
    def __init__(self, device: torch.device, policy: BatchPolicy, batcher: Batcher,
                 models: Callable[[str], ServedModel], metrics: Metrics, threads: int | None = None) -> None:
        self.device = device
        self.policy = policy
        # Intra-op threads of this worker's compute on a CPU (split between its shards, all of them for a lone
        # task); default: the constructing thread's count.
        self.threads = threads or torch.get_num_threads()
        # A caller who is alone does not wait for companions (see _policy_now).
        self._alone_policy = BatchPolicy(policy.max_batch_size, 0.0)
        self._alone = False  # the last batch had one task and nothing arrived while it computed
        self._batcher = batcher
        self._models = models
        self._metrics = metrics
        self._label = str(device)
        self._replicas: dict[str, ServedModel] = {}  # touched only by the worker thread
        self._shards: list[Shard] = []  # made by the worker thread when it starts
        self._ready = threading.Event()  # the worker thread has set its (and its shards') thread counts
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._inflight: list[Entry] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._thread = threading.Thread(target=self._thread_main, name=f"convlens-worker-{device}",
                                        daemon=True)  # a compute stuck past stop's grace must not block exit

    @property
    def busy(self) -> bool:
        return bool(self._inflight)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()
        self._ready.wait(30.0)  # so that no thread starts torch while the process-wide count is changing
        self._dispatcher = self._loop.create_task(self._dispatch(), name=f"convlens-dispatch-{self.device}")

    async def close(self, error: Callable[[], ConvLensError]) -> None:
        """Stop taking batches; fail what is still computing with `error()` (its result will be ignored)."""
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            await asyncio.gather(self._dispatcher, return_exceptions=True)
        for entry in self._inflight:
            if not entry.future.done():
                entry.future.set_exception(error())
        stuck = self.busy
        self._inflight = []
        self._jobs.put(None)  # the thread exits after its current batch, if any
        if self._thread.is_alive() and not stuck:
            await asyncio.to_thread(self._thread.join, 5.0)

    async def _dispatch(self) -> None:
        assert self._loop is not None
        changed = self._batcher.listen()
        while True:
            changed.clear()  # before take(): a put after it sets the event again, so no wake-up is lost
            batch, wait = self._batcher.take(self._policy_now(), time.monotonic(), self._label)
            if not batch:
                try:
                    await asyncio.wait_for(changed.wait(), wait)
                except TimeoutError:
                    pass
                continue
            done: asyncio.Future[None] = self._loop.create_future()
            self._inflight = batch
            self._jobs.put((batch, done))
            await done  # one batch at a time per device
            self._inflight = []
            self._alone = len(batch) == 1 and self._batcher.depth == 0

    def _policy_now(self) -> BatchPolicy:
        """The policy for the next take. Waiting max_batch_delay only pays when companions are likely: when
        the last batch ran alone and nobody arrived while it computed (one caller at a time), a lone task on
        this idle worker runs at once. Measured on the busy 2-core CPU, the 2 ms timed wait cost a lone caller
        15% (11.2-11.8 vs 13.3-13.7 requests/s with batching off), more than the delay itself: the loop
        must be woken by a timer on a contended machine. Any concurrency brings the delay back at once."""
        if self._alone and self._batcher.depth <= 1:
            return self._alone_policy
        return self.policy

    # ---- the worker thread ----

    def _thread_main(self) -> None:
        try:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)  # so ops without an explicit device land here too
            else:
                self._set_threads()
        finally:
            self._ready.set()
        try:
            self._serve()
        finally:
            for shard in self._shards:
                shard.stop()

    def _set_threads(self) -> None:
        """Start the shards, each with its share of the threads; this thread (lone tasks) gets them all; the
        process-wide value, which pinning changes, is put back as it was."""
        default = process_default_threads()
        if self.policy.shards > 1:
            per = max(1, self.threads // self.policy.shards)
            self._shards = [Shard(f"convlens-shard-{self.device}-{i}", per) for i in range(self.policy.shards)]
            for shard in self._shards:
                shard.start()
        pin_intra_op_threads(self.threads)
        set_process_default_threads(default)

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            batch, done = job
            try:
                outcomes = self._run(batch)
            except BaseException as exc:  # _run catches compute errors; this guards the thread itself
                outcomes = [(e, RuntimeError(f"worker {self.device} failed: {exc!r}"), None) for e in batch]
            try:
                assert self._loop is not None
                self._loop.call_soon_threadsafe(_settle, outcomes, done)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                return

    def _run(self, batch: list[Entry]) -> list[Outcome]:
        live = []
        for entry in batch:
            if entry.cancelled:  # the caller went away between take() and now: never compute it
                self._metrics.rejections.labels(model=entry.task.model, rpc=entry.task.rpc,
                                                reason="cancelled").inc()
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
            results = self._compute(task, [e.task.payload for e in live])
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
        self._metrics.worker_busy_seconds.labels(device=self._label).inc(elapsed)
        return outcomes

    def _compute(self, task: Task, payloads: list[Any]) -> list[Any]:
        """The batch's results in order: on this thread, or split between the shards (all finish first)."""
        mine = self._replica(task.model, self._replicas)
        if len(payloads) < 2 or not self._shards or not mine.layout_applies:  # ONNX sessions are not copied
            return list(task.compute(mine, payloads))
        def on(shard: Shard, chunk: Sequence[Any]) -> Callable[[], list[Any]]:
            return lambda: list(task.compute(self._replica(task.model, shard.replicas), chunk))

        futures = [shard.submit(on(shard, chunk))
                   for shard, chunk in zip(self._shards, split(payloads, len(self._shards)), strict=False)]
        results: list[Any] = []
        failure: BaseException | None = None
        for future in futures:  # wait for every chunk, so no shard still computes when the next batch comes
            try:
                results.extend(future.result())
            except BaseException as exc:
                failure = failure or exc
        if failure is not None:
            raise failure
        return results

    def _replica(self, name: str, replicas: dict[str, ServedModel]) -> ServedModel:
        """`replicas` belongs to the calling thread. Made lazily, there, so that a slow copy to a GPU never
        blocks the loop."""
        replica = replicas.get(name)
        if replica is None:
            fresh = {} if replicas is self._replicas else {"fresh": True}  # a shard's own module, for its hooks
            replica = replicas[name] = self._models(name).replica(
                self.device, memory_format=memory_format_for(self.device), **fresh)
        return replica


def _settle(outcomes: list[Outcome], done: asyncio.Future[None]) -> None:
    """On the loop: deliver results; futures already done (cancelled, or failed by stop) are skipped.

    The worker's `done` is set first: callbacks run in the order they are scheduled, so the dispatcher
    hands the worker its next batch before the callers' handlers encode their responses (which then
    overlaps the next compute instead of delaying it).
    """
    if not done.done():
        done.set_result(None)
    for entry, error, result in outcomes:
        if entry.future.done():
            continue
        if error is not None:
            entry.future.set_exception(error)
        else:
            entry.future.set_result(result)
