"""Fixtures for scheduler tests: metrics, fake models, a gate, and started schedulers stopped afterwards."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pytest
import torch

from convlens.server.errors import NotFound
from convlens.server.metrics import Metrics
from convlens.server.scheduler import BatchPolicy, Scheduler

from .helpers import FakeModel


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def fake_models() -> dict[str, FakeModel]:
    return {name: FakeModel(name) for name in ("m", "a", "b")}


@pytest.fixture
def gate() -> threading.Event:
    """Holds a Recorder's compute until set; make_scheduler's teardown sets it so no thread stays blocked."""
    return threading.Event()


@pytest.fixture
async def make_scheduler(metrics: Metrics, fake_models: dict[str, FakeModel], gate: threading.Event
                         ) -> AsyncIterator[Callable[..., Any]]:
    """make_scheduler(max_batch_size=, max_batch_delay=, max_queue=) -> a started Scheduler on [cpu]."""
    made: list[Scheduler] = []

    def lookup(name: str) -> Any:
        if name not in fake_models:
            raise NotFound(f"no model {name!r}")
        return fake_models[name]

    async def make(max_batch_size: int = 8, max_batch_delay: float = 0.005, max_queue: int = 256,
                   devices: Sequence[torch.device] = (torch.device("cpu"),)) -> Scheduler:
        policy = BatchPolicy(max_batch_size=max_batch_size, max_batch_delay=max_batch_delay)
        s = Scheduler(lookup, devices, metrics,
                      policies={str(d): policy for d in devices}, max_queue=max_queue)
        await s.start()
        made.append(s)
        return s

    yield make
    gate.set()
    for s in made:
        await s.stop(2.0)
