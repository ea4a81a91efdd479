"""CPU compute threads that each run their own batches side by side (a worker's `shards`, see
policy.BatchPolicy and worker.py's lanes).

Why: on the CPU, torch runs each op on an OpenMP team of intra-op threads that meet at a barrier after
every parallel region. When any other thread needs a core — the event loop decoding requests, gRPC
serialising answers, a load tester on the same machine — one team member is descheduled and the others
spin at the barrier waiting for it. Two single-threaded streams never wait for each other. Measured on the
2-core machine (EfficientNet-Lite0 forward + backward to the input, 224 px, channels_last, 2026-11-29):
one loop on 2 threads 36.5-38.1 images/s at batch 4, two loops on 1 thread each 41.4-42.7 in total (+12%);
with a process busy 25% of the time beside them, 24.8-25.8 against 35.8-36.2 (+42%).

Why a lone task on the worker thread used to run at 0.6x the speed of the same call on the main thread
(batch 1: 15.8-16.5 vs 24.9-26.6 images/s): GNU OpenMP counts every thread of every team in the process,
and once there are more than cores it has its team members sleep almost at once after each parallel region
instead of spinning, so each of the hundreds of regions of a forward + backward pays a futex wake-up. A
team the main thread started while loading models was enough. With the main thread at one intra-op thread
from the start, the same call on a fresh thread ran at 26.1 images/s. So `convlens serve` sets the process
to one intra-op thread before it loads anything (app.main), and only the workers (`pin_intra_op_threads`)
run teams: the worker's own, for lone tasks, and none in single-threaded shards.

Each shard is a daemon thread (a compute stuck past stop's grace must not block exit) whose intra-op
thread count is set once when it starts; torch keeps that count per thread. Each owns its replicas, so
hooks one shard registers never fire in another's forward.

A lane's thread ends when a BaseException that is not an Exception (SystemExit from a library's `sys.exit()`,
KeyboardInterrupt) escapes the work it runs: that work, and anything submitted after, fails with `LaneDied`
at once instead of waiting forever on a thread that is gone; the worker answers its callers UNAVAILABLE and
starts a fresh lane (worker.py).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

import torch

Work = tuple[Callable[[], Any], "Future[Any]"]
T = TypeVar("T")


def _on_fresh_threads(fns: Sequence[Callable[[], T]]) -> list[T]:
    """Each of `fns` on a new thread of its own, all at once; their results in order (the first error raised)."""
    futures: list[Future[T]] = [Future() for _ in fns]

    def run(fn: Callable[[], T], future: Future[T]) -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:
            future.set_exception(exc)

    threads = [threading.Thread(target=run, args=pair) for pair in zip(fns, futures, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [f.result() for f in futures]


def process_default_threads() -> int:
    """The intra-op thread count a thread that has not run torch yet will start with (torch's process-wide
    value; `torch.get_num_threads()` answers for the calling thread only)."""
    return _on_fresh_threads([torch.get_num_threads])[0]


def set_process_default_threads(n: int) -> None:
    """Set the count threads that have not run torch yet will start with, leaving the caller's own as it is
    (`torch.set_num_threads` sets both the calling thread's and the process-wide value)."""
    _on_fresh_threads([lambda: torch.set_num_threads(n)])


def threads_per_shard(shards: int, total: int | None = None) -> int:
    """Each of `shards` threads' share of `total` intra-op threads (default: the calling thread's count)."""
    return max(1, (torch.get_num_threads() if total is None else total) // shards)


def side_by_side(fns: Sequence[Callable[[], T]], threads: int | None) -> list[T]:
    """Run `fns` at once, each on a fresh thread pinned to `threads` intra-op threads (None: as torch gives
    them), as shards run; their results in order. The process-wide count is put back as it was."""
    default = process_default_threads()

    def pinned(fn: Callable[[], T]) -> Callable[[], T]:
        def run() -> T:
            if threads is not None:
                pin_intra_op_threads(threads)
            return fn()
        return run

    try:
        return _on_fresh_threads([pinned(fn) for fn in fns])
    finally:
        set_process_default_threads(default)


def pin_intra_op_threads(n: int) -> None:
    """Give the calling thread `n` intra-op threads for good.

    torch initialises a thread's count lazily, from the process-wide value, on its first parallel op; ask
    for the count first so that this thread is initialised now and the value set after it sticks.
    """
    torch.get_num_threads()
    torch.set_num_threads(n)


class LaneDied(Exception):
    """The lane's thread ended: the work it had in hand (or was given after) was not, and will not be, done."""


class Shard:
    """A compute thread: runs submitted callables one at a time, in order. `threads`: its intra-op thread
    count, pinned when it starts (None: left as torch gives it); `setup` runs first on the thread."""

    def __init__(self, name: str, threads: int | None, setup: Callable[[], Any] | None = None) -> None:
        self.name = name
        self.threads = threads
        self.replicas: dict[str, Any] = {}  # touched only by this shard's thread
        self.died: BaseException | None = None  # what ended the thread, once it has
        self._setup = setup
        self._work: queue.SimpleQueue[Work | None] = queue.SimpleQueue()
        self._lock = threading.Lock()  # submit vs. the thread's last drain: nothing is queued to a dead lane
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    @property
    def alive(self) -> bool:
        return self.died is None and self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()  # its thread count is pinned before anyone else sets the process-wide one
        if self.died is not None:
            raise RuntimeError(f"compute thread {self.name} failed to start: {self.died!r}") from self.died

    def stop(self) -> None:
        self._work.put(None)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def submit(self, fn: Callable[[], Any]) -> Future[Any]:
        future: Future[Any] = Future()
        with self._lock:
            if self.died is None:
                self._work.put((fn, future))
                return future
        future.set_exception(LaneDied(f"compute thread {self.name} ended earlier: {self.died!r}"))
        return future

    def _main(self) -> None:
        current: Future[Any] | None = None
        try:
            try:
                if self._setup is not None:
                    self._setup()
                if self.threads is not None:
                    pin_intra_op_threads(self.threads)
            finally:
                self._ready.set()
            while (work := self._work.get()) is not None:
                fn, current = work
                if current.set_running_or_notify_cancel():  # (not when cancelled while queued)
                    try:
                        current.set_result(fn())
                    except Exception as exc:  # the work failed; the thread goes on
                        current.set_exception(exc)
                # (#15, streams) Let the finished batch go now: kept in these locals while the thread waits for
                # the next one, the last batch's payloads (optimisation jobs, images) stayed alive until then.
                current = None
                del work, fn
        except BaseException as exc:  # SystemExit & co. end this thread: say so, never leave work hanging
            self._die(exc, current)

    def _die(self, exc: BaseException, current: Future[Any] | None) -> None:
        with self._lock:
            self.died = exc
            left = [] if current is None else [current]
            while True:
                try:
                    work = self._work.get_nowait()
                except queue.Empty:
                    break
                if work is not None:
                    left.append(work[1])
        for future in left:
            if not future.done():
                future.set_exception(LaneDied(f"compute thread {self.name} ended: {exc!r}"))


def split(items: Sequence[Any], parts: int) -> list[Sequence[Any]]:
    """`items` in at most `parts` contiguous, near-equal, non-empty chunks (larger ones first)."""
    parts = max(1, min(parts, len(items)))
    size, extra = divmod(len(items), parts)
    chunks, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        chunks.append(items[start:end])
        start = end
    return chunks
