"""Out of memory inside a batch (issue #15): split the batch and retry, so only a task that still fails alone
gets RESOURCE_EXHAUSTED; and a test-only fault hook that makes large batches fail as if out of memory.

A batch of many images needs memory in proportion; one that does not fit is computed again in halves (the
caches freed first), recursively, down to single tasks. A task that does not fit alone is refused with
RESOURCE_EXHAUSTED (retryable with a smaller request), never INTERNAL, and the worker goes on.

The fault hook is off in production: it is read from the environment variable CONVLENS_TEST_FAULTS, which only
tests set, e.g. "oom_batch_over=2" (a compute of more than 2 payloads raises torch.OutOfMemoryError) or
"oom_payload_over=2" together with it (a single payload whose `size` attribute or value exceeds 2 too).
Other faults of the same hook (faults helper, issue #15): "lane_dies=N" (the Nth batch a worker computes
ends its lane's thread, see `lane_death`) and "index_write_stall=1" (an index file's write stops halfway, see
`index_write_stall`).
"""

from __future__ import annotations

import gc
import itertools
import os
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from convlens.server.errors import ResourceExhausted

FAULTS_ENV = "CONVLENS_TEST_FAULTS"


def injected_faults() -> dict[str, float]:
    """The test-only faults asked for in CONVLENS_TEST_FAULTS ({} in production)."""
    text = os.environ.get(FAULTS_ENV, "")
    return {k.strip(): float(v) for k, v in (p.split("=", 1) for p in text.split(",") if "=" in p)}


def with_faults(compute: Callable[[Any, Sequence[Any]], Any], faults: dict[str, float]
                ) -> Callable[[Any, Sequence[Any]], Any]:
    if not faults:
        return compute
    over = faults.get("oom_batch_over")

    def faulty(replica: Any, payloads: Sequence[Any]) -> Any:
        if over is not None and len(payloads) > over:
            raise torch.OutOfMemoryError(f"injected: a batch of {len(payloads)} > {over:g}")
        return compute(replica, payloads)

    return faulty


def release_cached_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def compute_splitting(compute: Callable[[Any, Sequence[Any]], Any], replica: Any, payloads: Sequence[Any],
                      describe: str) -> list[Any]:
    """`compute(replica, payloads)` as a list of results; on out-of-memory, in halves, recursively. A payload
    that is out of memory alone gets a ResourceExhausted as its result (the others their own)."""
    try:
        return list(compute(replica, payloads))
    except (torch.OutOfMemoryError, MemoryError):
        release_cached_memory()
        if len(payloads) == 1:
            return [ResourceExhausted(f"out of memory computing this {describe} alone; retry with a smaller "
                                      "image, size or batch, or on another instance")]
    half = len(payloads) // 2
    return (compute_splitting(compute, replica, payloads[:half], describe)
            + compute_splitting(compute, replica, payloads[half:], describe))


# ---- a lane thread that dies (issue #15, faults) -------------------------------------------------------------

def lane_death(faults: dict[str, float]) -> Callable[[], None] | None:
    """With "lane_dies=N": a callable the worker runs on the lane's thread before each batch; the Nth call (in
    the worker, over all its lanes) raises SystemExit there, as a library's `sys.exit()` would, which ends
    that thread (scheduler/shards.py). None in production."""
    n = faults.get("lane_dies")
    if n is None:
        return None
    counter = itertools.count(1)  # next() is atomic under the GIL: lanes call it side by side

    def maybe_die() -> None:
        batch = next(counter)
        if batch == n:
            raise SystemExit(f"injected: the lane thread dies on batch {batch}")

    return maybe_die


# ---- an index build killed mid-write (issue #15, faults) -----------------------------------------------------

STALL_MARK = "convlens-test-fault: index write stalled at"


def index_write_stall(faults: dict[str, float]) -> Callable[[Path], None] | None:
    """With "index_write_stall=1": a callback for engine/topk/file_format.save that, once half of an index file
    is written, says so on stderr (STALL_MARK and the temporary's path) and blocks for good, so that a test can
    SIGKILL the process at exactly that point. None in production."""
    if not faults.get("index_write_stall"):
        return None

    def stall(tmp: Path) -> None:
        print(f"{STALL_MARK} {tmp}", file=sys.stderr, flush=True)
        threading.Event().wait()

    return stall
