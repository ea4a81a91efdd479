"""Stopping long compute between chunks once nobody waits for its result (issue #15).

Whoever runs a computation (the scheduler's worker) may install a stop condition, a plain callable, for the
current thread's context with `stop_when`; the engine's long loops (the chunks of integrated gradients,
SmoothGrad and every chunked backward) call `check()` between chunks, which raises `Stopped` once the
condition holds. Without a condition installed `check()` does nothing, so the engine runs as a library too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from convlens.server.errors import DeadlineExceeded

_condition: ContextVar[Callable[[], bool] | None] = ContextVar("convlens_stop_condition", default=None)


class Stopped(DeadlineExceeded):
    """Compute stopped between chunks: every caller of the batch had gone (cancelled or past its deadline)."""

    reason = "COMPUTE_STOPPED"


@contextmanager
def stop_when(condition: Callable[[], bool]) -> Iterator[None]:
    """Within the block, `check()` raises Stopped once `condition()` is true."""
    token = _condition.set(condition)
    try:
        yield
    finally:
        _condition.reset(token)


def check() -> None:
    """Raise Stopped when the installed stop condition holds (nothing happens without one)."""
    condition = _condition.get()
    if condition is not None and condition():
        raise Stopped("compute stopped: the caller went away or its deadline passed")
