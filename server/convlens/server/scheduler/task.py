"""A unit of work handed to the scheduler: what to compute, for which model, and with whom it may batch.

The scheduler knows nothing about what a batch computes: it groups tasks whose `batch_key` is equal,
waits up to the device's max_batch_delay for up to max_batch_size of them, then calls the group's
`compute(replica, payloads)` once on a worker thread. `compute` returns one result per payload, in order;
a result that is an Exception instance fails only that task.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from convlens.server.models.model import ServedModel

Compute = Callable[[ServedModel, Sequence[Any]], Sequence[Any]]


@dataclass(frozen=True)
class Task:
    model: str  # a served model's name
    rpc: str  # metric label, e.g. "Saliency"
    key: Hashable  # tasks with equal (model, rpc, key) may share one batch (must imply the same compute)
    payload: Any
    compute: Compute
    deadline: float | None = None  # time.monotonic() after which the task is dropped before compute
    # Optimisation steps (scheduler/steps.py): the device holding the job's state (only its worker takes
    # the task), and the number of live jobs of its group: the group is ready once that many are queued.
    # A task with a quorum is a running job's next step, so max_queue never refuses it.
    device: str | None = None
    quorum: Callable[[], int] | None = None

    @property
    def batch_key(self) -> tuple[str, str, Hashable, str | None]:
        return (self.model, self.rpc, self.key, self.device)

    def gone_reason(self, now: float) -> str:
        """Why a task whose caller went away was not computed: "deadline" when its deadline had passed (grpc
        cancels a call at its deadline, racing the scheduler's own expiry timer for the same instant),
        "cancelled" when the caller left before it."""
        return "deadline" if self.deadline is not None and now >= self.deadline else "cancelled"
