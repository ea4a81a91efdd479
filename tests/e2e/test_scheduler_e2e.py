"""Overload, deadlines and cancellation through a real server with a tiny queue, no batching and one compute lane."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from convlens.client import AsyncClient
from convlens.client import _exceptions as exc
from convlens.server.launcher import ServerProcess

pytestmark = pytest.mark.slow
IMAGE = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
SLOW = {"method": "integrated_gradients", "steps": 24}  # about a second or more on 2 cores


@pytest.fixture(scope="module")
def small_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("small") / "server.log"
    # One compute lane (no shards): while it computes a call, the next one waits in the queue.
    args = ["--device", "cpu", "--max-queue", "2", "--batch", "cpu=1:0:1", "--max-message-mb", "1"]
    with ServerProcess(args, log_path=log) as srv:
        yield srv


def metric(server: ServerProcess, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_for(server: ServerProcess, what: str, condition: Callable[[Callable[..., float]], bool],
             timeout: float = 120.0) -> None:
    """Poll the server's metrics until `condition(metric)` holds: its own account, never a sleep and a hope."""
    deadline = time.monotonic() + timeout
    while not condition(lambda name, **labels: metric(server, name, **labels)):
        assert time.monotonic() < deadline, f"the server never reported: {what}"
        time.sleep(0.02)


def computing(server: ServerProcess, started_before: float) -> None:
    """Until one more task has left the queue for a worker (its queue wait is observed as compute starts)."""
    wait_for(server, "a task in compute",
             lambda m: m("convlens_scheduler_queue_wait_seconds_count") >= started_before + 1)


def test_a_full_queue_is_refused_at_once_and_every_accepted_call_completes(small_server: ServerProcess) -> None:
    async def run() -> list[object]:
        async with AsyncClient(small_server.address, timeout=300) as c:
            calls = [c.saliency(IMAGE, "efficientnet_lite0", **SLOW) for _ in range(8)]
            return await asyncio.gather(*calls, return_exceptions=True)

    started = time.monotonic()
    results = asyncio.run(run())
    refused = [r for r in results if isinstance(r, exc.ResourceExhaustedError)]
    done = [r for r in results if not isinstance(r, Exception)]
    assert refused and done, results
    assert len(refused) + len(done) == 8, [r for r in results if isinstance(r, Exception)]
    assert "queue" in refused[0].message
    assert time.monotonic() - started < 120
    assert metric(small_server, "convlens_scheduler_rejections_total", reason="queue_full") >= len(refused)


def test_a_call_whose_deadline_passes_in_the_queue_is_dropped_before_compute(small_server: ServerProcess) -> None:
    before = metric(small_server, "convlens_scheduler_rejections_total", reason="deadline")
    started = metric(small_server, "convlens_scheduler_queue_wait_seconds_count")

    async def run() -> None:
        async with AsyncClient(small_server.address, timeout=300) as c:
            long = asyncio.ensure_future(c.saliency(IMAGE, "efficientnet_lite0", **SLOW))
            await asyncio.to_thread(computing, small_server, started)  # the worker is busy with `long`
            with pytest.raises(exc.DeadlineExceededError):
                await c.saliency(IMAGE, "efficientnet_lite0", timeout=0.5, **SLOW)
            await long

    asyncio.run(run())
    wait_for(small_server, "the queued call dropped at its deadline",
             lambda m: m("convlens_scheduler_rejections_total", reason="deadline") >= before + 1)
    assert metric(small_server, "convlens_scheduler_rejections_total", reason="deadline") == before + 1


def test_a_cancelled_call_is_never_computed_and_does_not_block_the_next(small_server: ServerProcess) -> None:
    before_cancel = metric(small_server, "convlens_scheduler_rejections_total", reason="cancelled")
    before_done = metric(small_server, "convlens_scheduler_tasks_total", rpc="Saliency")
    started = metric(small_server, "convlens_scheduler_queue_wait_seconds_count")

    async def run() -> None:
        async with AsyncClient(small_server.address, timeout=300) as c:
            long = asyncio.ensure_future(c.saliency(IMAGE, "efficientnet_lite0", **SLOW))
            await asyncio.to_thread(computing, small_server, started)  # the worker is busy with `long`
            doomed = asyncio.ensure_future(c.saliency(IMAGE, "efficientnet_lite0", **SLOW))
            await asyncio.to_thread(wait_for, small_server, "the second call queued",
                                    lambda m: m("convlens_scheduler_queue_depth") >= 1)
            doomed.cancel()
            after = await c.saliency(IMAGE, "efficientnet_lite0", method="gradient")
            assert after.attribution.shape == (3, 224, 224)
            await long

    asyncio.run(run())
    wait_for(small_server, "both surviving calls counted",
             lambda m: m("convlens_scheduler_tasks_total", rpc="Saliency") >= before_done + 2)
    assert metric(small_server, "convlens_scheduler_rejections_total", reason="cancelled") == before_cancel + 1
    assert metric(small_server, "convlens_scheduler_tasks_total", rpc="Saliency") == before_done + 2


def test_a_message_over_the_configured_limit_is_refused_and_the_server_goes_on(small_server: ServerProcess) -> None:
    big = np.random.default_rng(1).integers(0, 256, (800, 800, 3), dtype=np.uint8)  # 1.9 MB raw > 1 MiB

    async def run() -> None:
        async with AsyncClient(small_server.address, timeout=60) as c:
            with pytest.raises(exc.ResourceExhaustedError):
                await c.saliency(big, "efficientnet_lite0")
            ok = await c.saliency(IMAGE, "efficientnet_lite0")
            assert ok.attribution.shape == (3, 224, 224)

    asyncio.run(run())
