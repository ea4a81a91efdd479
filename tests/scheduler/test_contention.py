"""With --lone-all-threads a lone task takes the worker's device lane (every intra-op thread) only while the
CPUs are not contended; on busy CPUs it runs on a one-thread shard, whose result is the same (issue #15: a team
of threads on busy cores made the first calls of each run take seconds)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from convlens.server.compute.saliency import SaliencyPayload, compute_saliency
from convlens.server.engine.saliency import SaliencyOptions
from convlens.server.engine.targets import ClassTarget
from convlens.server.metrics import Metrics
from convlens.server.models.model import ServedModel
from convlens.server.scheduler import BatchPolicy, Scheduler, Task, contention
from convlens.server.scheduler.contention import Contention, cpu_pressure
from tests.engine.conftest import LiteNet, randomise_batchnorm, seeded
from tests.scheduler.test_layout import images, served

PSI_TEXT = "some avg10={some} avg60=3.00 avg300=1.00 total=123\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"


def test_pressure_is_read_from_the_some_line(tmp_path: Path) -> None:
    psi = tmp_path / "cpu"
    psi.write_text(PSI_TEXT.format(some="87.59"))
    assert cpu_pressure(psi) == pytest.approx(87.59)
    assert cpu_pressure(tmp_path / "missing") is None
    psi.write_text("garbage\n")
    assert cpu_pressure(psi) is None


def test_busy_follows_the_pressure_and_is_cached(tmp_path: Path) -> None:
    psi = tmp_path / "cpu"
    psi.write_text(PSI_TEXT.format(some="2.00"))
    c = Contention(psi, limit=10.0)
    assert not c.busy(now=100.0)
    psi.write_text(PSI_TEXT.format(some="55.00"))
    assert not c.busy(now=100.0 + contention.CACHE_SECONDS / 2)  # cached
    assert c.busy(now=100.0 + contention.CACHE_SECONDS)


def test_without_pressure_figures_the_load_average_decides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(contention.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(contention.os, "getloadavg", lambda: (2.5, 1.0, 1.0))
    assert Contention(tmp_path / "missing").busy(now=0.0)
    monkeypatch.setattr(contention.os, "getloadavg", lambda: (0.4, 1.0, 1.0))
    assert not Contention(tmp_path / "missing").busy(now=0.0)


@pytest.fixture(scope="module")
def lite() -> ServedModel:
    return served(randomise_batchnorm(seeded(LiteNet(), 13)))


@pytest.mark.parametrize("busy", [False, True])
async def test_a_lone_task_runs_on_every_thread_only_when_the_cpus_are_quiet(
        lite: ServedModel, busy: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Contention, "busy", lambda self, now=None: busy)
    seen: list[tuple[str, int]] = []

    def compute(replica: ServedModel, payloads: Any) -> list[Any]:
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return compute_saliency(replica, payloads)

    total = torch.get_num_threads()
    scheduler = Scheduler(lambda name: lite, [torch.device("cpu")], Metrics(),
                          policies={"cpu": BatchPolicy(4, 0.0, shards=2)}, max_queue=8, lone_all_threads=True)
    payload = SaliencyPayload(SaliencyOptions(), images(1)[0], ClassTarget(2))
    await scheduler.start()
    try:
        (got,) = [await scheduler.submit(Task(model="tiny", rpc="Saliency", key=payload.batch_key, payload=payload,
                                              compute=compute))]
    finally:
        await scheduler.stop(2.0)
    ((thread, threads),) = seen
    if busy and total > 1:
        assert "shard" in thread and threads == max(1, total // 2)
    else:
        assert "worker" in thread and threads == total
    (want,) = compute_saliency(lite, [payload])
    torch.testing.assert_close(got.attribution, want.attribution, rtol=1e-4,
                               atol=1e-5 * float(want.attribution.abs().max()))
