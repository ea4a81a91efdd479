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

import ctypes
import gc
import itertools
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

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


# ---- budget (issue #15): stop compute nobody waits for; give freed memory back to the system ----

def stop_condition(entries: Sequence[Any], clock: Callable[[], float] = time.monotonic) -> Callable[[], bool]:
    """True once every entry of a batch is gone: its caller cancelled (`entry.cancelled`) or its task's deadline
    has passed. The engine checks it between chunks (engine/interrupt.py), so companions still waiting keep the
    batch going, and a batch nobody waits for frees its lane at the next chunk."""

    def gone() -> bool:
        now = clock()
        return all(e.cancelled or (e.task.deadline is not None and now >= e.task.deadline) for e in entries)

    return gone


# A batch that computed this long is likely to have freed large buffers: trim after it (glibc keeps freed heap
# memory, so RSS stayed ~1 GB above its baseline after large requests), once the worker is idle.
TRIM_AFTER_S = 0.5
TRIM_IDLE_S = 1.0  # ... once the worker has had nothing to do for this long (worker.py)


TRIM_ENV = "CONVLENS_MALLOC_TRIM"  # "0": no trims (to measure what they give back: tools/reliability/budget.py)


def _load_malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux") or os.environ.get(TRIM_ENV, "1") == "0":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        trim = libc.malloc_trim  # glibc only (musl has none)
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return cast(Callable[[int], int], trim)


_MALLOC_TRIM = _load_malloc_trim()


def resident_bytes() -> int | None:
    """This process's resident set size (Linux), else None."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def trim_memory() -> int | None:
    """Return freed heap memory to the system (glibc malloc_trim(0)); the bytes of RSS given back, or None where
    there is no malloc_trim (not Linux/glibc)."""
    if _MALLOC_TRIM is None:
        return None
    before = resident_bytes()
    _MALLOC_TRIM(0)
    after = resident_bytes()
    return max(0, before - after) if before is not None and after is not None else 0
