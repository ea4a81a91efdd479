"""Helpers for scheduler tests: a fake model, a compute that records its batches, small utilities."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from convlens.server.scheduler import Task


class FakeModel:
    """Enough of a ServedModel for the scheduler: a name and .replica(device, memory_format=)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.replicas: list[torch.device] = []

    def replica(self, device: torch.device, memory_format: torch.memory_format | None = None, *,
                fresh: bool = False) -> FakeModel:
        self.replicas.append(device)
        return self


class Recorder:
    """A compute that records every batch it sees (model name, payloads) and returns payload * 10.

    `gate`, when given, blocks each compute until it is set (so tests can hold a worker busy);
    `started` is set when a compute begins.
    """

    def __init__(self, delay: float = 0.0, gate: threading.Event | None = None) -> None:
        self.batches: list[tuple[str, list[Any]]] = []
        self.delay = delay
        self.gate = gate
        self.started = threading.Event()

    def __call__(self, replica: Any, payloads: Sequence[Any]) -> list[Any]:
        self.batches.append((replica.name, list(payloads)))
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(10), "test gate never opened"
        if self.delay:
            time.sleep(self.delay)
        return [p * 10 for p in payloads]

    @property
    def payloads(self) -> list[Any]:
        return [p for _, batch in self.batches for p in batch]


def task(payload: Any, compute: Callable[..., Any], *, model: str = "m", rpc: str = "Saliency",
         key: Any = "k", deadline: float | None = None) -> Task:
    return Task(model=model, rpc=rpc, key=key, payload=payload, compute=compute, deadline=deadline)


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition not reached in time"
        await asyncio.sleep(0.002)
