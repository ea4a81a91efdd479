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
    # The copy of the model the task runs on: the one the service looked up (models/repository.py). A reload
    # or unload while the task waits changes nothing for it, and tasks of two copies never share a batch.
    # None: whatever copy `model` names when the worker takes it (tests, tools).
    served: ServedModel | None = None
    # Pixels this task's compute works on (an optimisation step: its job's; engine/budget.py): the batcher keeps
    # a batch's sum within the scheduler's max_batch_cost (a task over it alone still runs, alone). 0: free.
    cost: int = 0

    @property
    def copy_id(self) -> int | None:
        return self.served.copy_id if self.served is not None else None

    @property
    def batch_key(self) -> tuple[str, str, Hashable, str | None, int | None]:
        return (self.model, self.rpc, self.key, self.device, self.copy_id)

    def gone_reason(self, now: float) -> str:
        """Why a task whose caller went away was not computed: "deadline" when its deadline had passed (grpc
        cancels a call at its deadline, racing the scheduler's own expiry timer for the same instant),
        "cancelled" when the caller left before it."""
        return "deadline" if self.deadline is not None and now >= self.deadline else "cancelled"
