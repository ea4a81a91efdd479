"""Stopping long compute between chunks once nobody waits for its result (issue #15).

Whoever runs a computation (the scheduler's worker) may install a stop condition, a plain callable, for the
current thread's context with `stop_when`; the engine's long loops (the chunks of integrated gradients,
SmoothGrad and every chunked backward) call `check()` between chunks, which raises a DeadlineExceeded with
reason COMPUTE_STOPPED (`stopped(exc)` tells it apart) once the condition holds. Without a condition
installed `check()` does nothing, so the engine runs as a library too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from convlens.server.errors import DeadlineExceeded

_condition: ContextVar[Callable[[], bool] | None] = ContextVar("convlens_stop_condition", default=None)


REASON = "COMPUTE_STOPPED"


def stopped(exc: BaseException) -> bool:
    """Whether `exc` is check()'s: compute stopped because every caller of the batch had gone."""
    return isinstance(exc, DeadlineExceeded) and exc.reason == REASON


@contextmanager
def stop_when(condition: Callable[[], bool]) -> Iterator[None]:
    """Within the block, `check()` raises once `condition()` is true."""
    token = _condition.set(condition)
    try:
        yield
    finally:
        _condition.reset(token)


def check() -> None:
    """Raise DeadlineExceeded (reason COMPUTE_STOPPED) when the installed stop condition holds (nothing happens
    without one)."""
    condition = _condition.get()
    if condition is not None and condition():
        raise DeadlineExceeded("compute stopped: the caller went away or its deadline passed", reason=REASON)
