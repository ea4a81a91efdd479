"""Compute failures: a raising batch fails its own tasks only; a per-item Exception fails one task."""

from __future__ import annotations

import asyncio

import pytest

from convlens.server.errors import FailedPrecondition, NotFound

from .helpers import Recorder, task


async def test_compute_exception_fails_that_batch_only(make_scheduler) -> None:
    s = await make_scheduler(max_batch_size=4, max_batch_delay=0.05)
    boom = ValueError("boom")

    def failing(replica, payloads):
        raise boom

    rec = Recorder()
    results = await asyncio.gather(*(s.submit(task(i, failing, key="bad")) for i in range(3)),
                                   *(s.submit(task(i, rec, key="good")) for i in range(2)),
                                   return_exceptions=True)
    assert results[:3] == [boom, boom, boom]  # kept as is: the transport maps it to INTERNAL
    assert results[3:] == [0, 10]
    assert await s.submit(task(7, rec)) == 70  # the worker survived


async def test_domain_errors_are_kept(make_scheduler) -> None:
    s = await make_scheduler(max_batch_size=4, max_batch_delay=0.0)

    def grads(replica, payloads):
        raise FailedPrecondition("no gradients for ONNX models")

    with pytest.raises(FailedPrecondition, match="no gradients"):
        await s.submit(task(1, grads))
    with pytest.raises(NotFound):  # models(name) raising, e.g. an unknown model, fails the batch too
        await s.submit(task(1, Recorder(), model="nope"))


async def test_per_item_exception_fails_only_that_task(make_scheduler) -> None:
    s = await make_scheduler(max_batch_size=4, max_batch_delay=0.05)

    def picky(replica, payloads):
        return [ValueError(f"bad {p}") if p == 2 else p * 10 for p in payloads]

    results = await asyncio.gather(*(s.submit(task(i, picky)) for i in range(4)), return_exceptions=True)
    assert results[0] == 0 and results[1] == 10 and results[3] == 30
    assert isinstance(results[2], ValueError) and str(results[2]) == "bad 2"


async def test_wrong_number_of_results_fails_the_batch(make_scheduler) -> None:
    s = await make_scheduler(max_batch_size=4, max_batch_delay=0.0)
    with pytest.raises(RuntimeError, match="returned 0 results for 1 payloads"):
        await s.submit(task(1, lambda replica, payloads: []))
    assert await s.submit(task(1, Recorder())) == 10
