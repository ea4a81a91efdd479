"""Deadline-aware admission: a one-shot task whose deadline the queue cannot meet is refused at once.

Without it an overloaded server let callers wait out their whole deadline (64 Saliency callers with a 2 s
deadline: 509 DEADLINE_EXCEEDED after 2 s each, 0 refusals). The estimate is the queue ahead, batched as the
workers will batch it, times the recent compute time per batch of each (model, rpc), divided among the lanes
that compute side by side. A task is refused when that queue alone outlasts its deadline (its own batch is
not counted: with it, tasks ahead that were about to expire made false refusals in tests/scheduler's stress
test), only when there is a queue to blame (an idle server still tries a tight deadline) and only once its
(model, rpc) has a measured batch time.
Optimisation steps (tasks with a quorum) are never refused here: a running job always gets its next step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

ALPHA = 0.3  # weight of the newest batch in the moving average


class ServiceTimes:
    """Recent compute seconds per batch, per (model, rpc): an exponential moving average. Written by lane
    threads after each batch and read on the loop; a float per key, so a torn read is impossible and a lost
    update only delays the average by one batch."""

    def __init__(self) -> None:
        self._per_batch: dict[tuple[str, str], float] = {}

    def record(self, model: str, rpc: str, seconds: float) -> None:
        key = (model, rpc)
        old = self._per_batch.get(key)
        self._per_batch[key] = seconds if old is None else (1 - ALPHA) * old + ALPHA * seconds

    def per_batch(self, model: str, rpc: str) -> float | None:
        return self._per_batch.get((model, rpc))


def estimated_wait(queued: Iterable[tuple[str, str, int]], times: ServiceTimes, batch: int, lanes: int
                   ) -> float:
    """Seconds until the queued groups (model, rpc, tasks) are computed: batches of `batch` per lane, `lanes`
    side by side. Groups whose (model, rpc) has no measured time yet count nothing (not known to be slow)."""
    total = 0.0
    for model, rpc, count in queued:
        per = times.per_batch(model, rpc)
        if per is not None:
            total += math.ceil(count / max(batch, 1)) * per
    return total / max(lanes, 1)
