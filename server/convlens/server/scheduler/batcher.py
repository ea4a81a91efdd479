"""The dynamic batcher: queued tasks grouped by batch key, handed to free workers fairly.

Everything here runs on the event-loop thread, so it needs no locks: `submit` puts, a worker's dispatcher
coroutine takes, a cancelled caller discards. Worker threads never touch it.

Fairness: models are kept in round-robin order. A worker looks at the models in that order and serves the
first one with a ready group; that model then moves to the back. So a flood for model A costs model B at
most one of A's batches. Within a model the RPC served least recently goes first (so a backlog of one-shot
tasks and a stream of optimisation steps alternate instead of one starving the other), and within an RPC
the ready group with the oldest task, so one key cannot starve another either.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from convlens.server.errors import ConvLensError, DeadlineExceeded, ResourceExhausted
from convlens.server.metrics import Metrics
from convlens.server.scheduler.policy import BatchPolicy
from convlens.server.scheduler.task import Task

QUEUE_DEPTH_DEVICE = "all"  # one shared queue feeds every device, so depth has no per-device meaning


@dataclass(eq=False)  # identity equality: list.remove must find this very entry
class Entry:
    task: Task
    future: asyncio.Future[Any]
    enqueued: float  # time.monotonic() at submit
    cancelled: bool = False  # set on the loop when the caller goes away; read by the worker thread


class Batcher:
    def __init__(self, metrics: Metrics, max_queue: int, max_batch_cost: int = 0) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.max_queue = max_queue
        # A batch's summed Task.cost at most (0: unbounded): several large optimisation steps in one batch
        # would need their memory at once (issue #15). A group that reaches it is ready without waiting.
        self.max_batch_cost = max_batch_cost
        self._metrics = metrics
        # model -> batch_key -> entries, oldest first; model order is the round-robin order.
        self._models: OrderedDict[str, dict[Hashable, list[Entry]]] = OrderedDict()
        self._depth = 0
        self._served: dict[tuple[str, str], int] = {}  # (model, rpc) -> sequence number of its last batch
        self._batches = 0
        self._listeners: list[asyncio.Event] = []
        self.flushing = False  # when stopping: every group is ready at once, nobody waits for companions
        self._changed()

    @property
    def depth(self) -> int:
        return self._depth

    def listen(self) -> asyncio.Event:
        """An event set whenever the queue changes in a way that may make a batch ready."""
        event = asyncio.Event()
        self._listeners.append(event)
        return event

    def put(self, entry: Entry) -> None:
        task = entry.task
        if self._depth >= self.max_queue and task.quorum is None:  # a running job's next step is never refused
            self._reject(task, "queue_full")
            raise ResourceExhausted(f"server busy: {self._depth} tasks queued (max_queue={self.max_queue}); "
                                    "retry with backoff", reason="QUEUE_FULL")
        self._models.setdefault(task.model, {}).setdefault(task.batch_key, []).append(entry)
        self._depth += 1
        self._changed()

    def queued(self) -> list[tuple[str, str, int]]:
        """(model, rpc, tasks) of every queued group of one-shot tasks (steps excluded: their jobs run anyway)."""
        return [(model, group[0].task.rpc, len(group)) for model, groups in self._models.items()
                for group in groups.values() if group and group[0].task.quorum is None]

    def discard(self, entry: Entry) -> bool:
        """Remove a still-queued entry (its caller went away); False when it was already taken."""
        groups = self._models.get(entry.task.model)
        group = groups.get(entry.task.batch_key) if groups else None
        if group is None or entry not in group:
            return False
        group.remove(entry)
        self._prune(entry.task.model, entry.task.batch_key)
        self._depth -= 1
        self._changed()
        return True

    def take(self, policy: BatchPolicy, now: float, device: str | None = None
             ) -> tuple[list[Entry], float | None]:
        """The next batch for a free worker with `policy` on `device`: (entries, None), or ([], seconds until
        some group becomes ready for it; None when nothing is queued).

        Tasks pinned to another device are not this worker's. A group of optimisation steps (tasks with a
        quorum) is ready as soon as every live job of the group is queued, or max_batch_size of them;
        it never waits max_batch_delay (a lone job would pay it on each of its hundreds of steps)."""
        self._expire(now)
        wait: float | None = None
        for model, groups in self._models.items():
            best: list[Entry] | None = None
            for group in groups.values():
                first = group[0].task
                if first.device is not None and first.device != device:
                    continue
                if first.quorum is not None:
                    if (self.flushing or len(group) >= min(policy.max_batch_size, max(first.quorum(), 1))
                            or self._full_by_cost(group)):
                        if best is None or self._before(group, best):
                            best = group
                    continue
                ready_at = group[0].enqueued + policy.max_batch_delay
                if (self.flushing or len(group) >= policy.max_batch_size or ready_at <= now
                        or self._full_by_cost(group)):
                    if best is None or self._before(group, best):
                        best = group
                else:
                    wait = ready_at - now if wait is None else min(wait, ready_at - now)
            if best is not None:
                batch = self._within_cost(best[:policy.max_batch_size])
                del best[:len(batch)]
                self._models.move_to_end(model)  # served: to the back of the round robin
                self._batches += 1
                self._served[(model, batch[0].task.rpc)] = self._batches
                self._prune(model, batch[0].task.batch_key)
                self._depth -= len(batch)
                self._changed()
                return batch, None  # we stop iterating, so changing the dict above is safe
        return [], wait

    def _full_by_cost(self, group: list[Entry]) -> bool:
        return bool(self.max_batch_cost) and sum(e.task.cost for e in group) >= self.max_batch_cost

    def _within_cost(self, entries: list[Entry]) -> list[Entry]:
        """The longest prefix of `entries` whose summed cost fits max_batch_cost (at least one entry)."""
        if not self.max_batch_cost:
            return entries
        total = 0
        for i, entry in enumerate(entries):
            total += entry.task.cost
            if i and total > self.max_batch_cost:
                return entries[:i]
        return entries

    def _before(self, group: list[Entry], other: list[Entry]) -> bool:
        """Whether ready `group` goes before ready `other` (same model): its RPC was served less recently,
        or, for the same RPC, its oldest task is older."""
        a, b = group[0].task, other[0].task
        if a.rpc != b.rpc:
            return self._served.get((a.model, a.rpc), 0) < self._served.get((b.model, b.rpc), 0)
        return group[0].enqueued < other[0].enqueued

    def notify(self) -> None:
        """Something outside the queue changed readiness (a job left, so a step group's quorum dropped)."""
        self._changed()

    def flush(self) -> None:
        self.flushing = True
        self._changed()

    def drain(self, error: Callable[[], ConvLensError], reason: str) -> None:
        """Fail every queued entry with a fresh `error()` (stopping after grace ran out)."""
        for groups in self._models.values():
            for group in groups.values():
                for entry in group:
                    self._fail(entry, error(), reason)
        self._models.clear()
        self._depth = 0
        self._changed()

    def _expire(self, now: float) -> None:
        """Drop every queued task whose deadline has passed: it must never reach compute."""
        expired = [e for groups in self._models.values() for group in groups.values() for e in group
                   if e.task.deadline is not None and e.task.deadline <= now]
        for entry in expired:
            self.discard(entry)
            self._fail(entry, DeadlineExceeded(
                f"deadline passed before compute (queued {now - entry.enqueued:.3f}s); "
                "the server is busy: retry with a longer deadline or later"), "deadline")

    def _fail(self, entry: Entry, error: ConvLensError, reason: str) -> None:
        self._reject(entry.task, reason)
        if not entry.future.done():
            entry.future.set_exception(error)

    def _reject(self, task: Task, reason: str) -> None:
        self._metrics.rejections.labels(model=task.model, rpc=task.rpc, reason=reason).inc()

    def _prune(self, model: str, key: Hashable) -> None:
        groups = self._models[model]
        if not groups[key]:
            del groups[key]
        if not groups:
            del self._models[model]

    def _changed(self) -> None:
        self._metrics.queue_depth.labels(device=QUEUE_DEPTH_DEVICE).set(self._depth)
        for event in self._listeners:
            event.set()
