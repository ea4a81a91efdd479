"""The load tester against the fake server, and its Prometheus text parser."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from convlens.client._cli import main
from convlens.client.loadtest import (
    LoadTestConfig,
    Sample,
    format_table,
    parse_metrics,
    run_loadtest,
    run_loadtest_async,
    server_split,
    synthetic_image,
    write_csv,
)
from convlens.v1 import convlens_pb2 as pb

from .fake_server import FakeServer

EXPOSITION = r'''
# HELP convlens_scheduler_queue_wait_seconds Time a task waited from submission to the start of its batch.
# TYPE convlens_scheduler_queue_wait_seconds histogram
convlens_scheduler_queue_wait_seconds_bucket{model="m",rpc="Saliency",le="0.005"} 3.0
convlens_scheduler_queue_wait_seconds_bucket{model="m",rpc="Saliency",le="+Inf"} 4.0
convlens_scheduler_queue_wait_seconds_sum{model="m",rpc="Saliency"} 0.5
convlens_scheduler_queue_wait_seconds_count{model="m",rpc="Saliency"} 4.0
convlens_scheduler_queue_wait_seconds_count{model="m",rpc="GetFilters"} 100.0
convlens_scheduler_compute_seconds_sum{device="cuda:0",model="m",rpc="Saliency"} 1.0 1700000000000
convlens_scheduler_compute_seconds_sum{device="cuda:1",model="m",rpc="Saliency"} 1.0
convlens_scheduler_compute_seconds_count{device="cuda:0",model="m",rpc="Saliency"} 2.0
convlens_scheduler_compute_seconds_count{device="cuda:1",model="m",rpc="Saliency"} 2.0
odd_label{path="a \"quoted\", comma\\n",x="y"} NaN
up 1
not a metric line
'''


def test_parse_metrics() -> None:
    samples = parse_metrics(EXPOSITION)
    assert Sample("up", {}, 1.0) in samples
    bucket = samples[0]
    assert bucket.name == "convlens_scheduler_queue_wait_seconds_bucket"
    assert bucket.labels == {"model": "m", "rpc": "Saliency", "le": "0.005"} and bucket.value == 3.0
    odd = next(s for s in samples if s.name == "odd_label")
    assert odd.labels == {"path": 'a "quoted", comma\\n', "x": "y"} and math.isnan(odd.value)
    ts = next(s for s in samples if s.name.endswith("compute_seconds_sum"))
    assert ts.value == 1.0  # the timestamp is not the value


def test_server_split_uses_deltas_and_filters_by_rpc() -> None:
    after = parse_metrics(EXPOSITION)
    before = [Sample("convlens_scheduler_queue_wait_seconds_sum", {"model": "m", "rpc": "Saliency"}, 0.1),
              Sample("convlens_scheduler_queue_wait_seconds_count", {"model": "m", "rpc": "Saliency"}, 2.0)]
    wait, compute, batch = server_split(before, after, rpc="Saliency", model="m")
    assert wait == pytest.approx(200.0)  # (0.5 - 0.1) / (4 - 2) s, in ms
    assert compute == pytest.approx(500.0)  # summed over devices: 2.0 s / 4 batches
    assert batch is None  # no batch-size series: unknown, not zero
    assert server_split(after, after, rpc="Saliency") == (None, None, None)


def test_synthetic_image_is_deterministic() -> None:
    a = synthetic_image()
    assert a.shape == (224, 224, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, synthetic_image())
    assert a.std() > 20  # not flat


def test_sweep_against_fake_server(server: FakeServer, tmp_path: Path) -> None:
    cfg = LoadTestConfig(target=server.target, model="efficientnet_lite0", concurrency=(1, 2), duration=1.0,
                         warmup=0.2, metrics_url=server.metrics_url)
    seen: list[int] = []
    results = run_loadtest(cfg, on_level=lambda r: seen.append(r.concurrency))
    assert [r.concurrency for r in results] == seen == [1, 2]
    for r in results:
        assert r.ok > 0 and r.throughput > 0 and r.errors == {}
        assert 0 < r.p50_ms <= r.p90_ms <= r.p99_ms
        # The fake endpoint reports 2 ms queue wait per task, 4 ms per batch, batches of 2.
        assert r.queue_wait_ms == pytest.approx(2.0)
        assert r.compute_ms_per_batch == pytest.approx(4.0)
        assert r.mean_batch_size == pytest.approx(2.0)
    req = server.rec.requests[-1]
    assert not req.render_overlay and req.image.encoded.startswith(b"\x89PNG")
    # it asks only for what it measures: the heatmap and the predictions, not the float attribution
    assert list(req.outputs) == [pb.SALIENCY_OUTPUT_HEATMAP, pb.SALIENCY_OUTPUT_PREDICTIONS]

    out = tmp_path / "sweep.csv"
    write_csv(results, out)
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["concurrency"]) for r in rows] == [1, 2] and float(rows[0]["throughput_rps"]) > 0
    table = format_table(results)
    assert table.splitlines()[0].split()[:4] == ["conc", "ok", "err", "req/s"]
    assert len(table.splitlines()) == 3


async def test_cheap_rpcs_and_errors(server: FakeServer) -> None:
    for rpc in ("list_models", "get_filters"):
        cfg = LoadTestConfig(target=server.target, rpc=rpc, concurrency=(2,), duration=0.3, warmup=0.0,
                             channels=2, metrics_url=server.metrics_url)
        [r] = await run_loadtest_async(cfg)
        assert r.ok > 0 and r.errors == {}
        assert r.queue_wait_ms is None  # no scheduler series for these RPCs
    cfg = LoadTestConfig(target=server.target, model="missing", concurrency=(1,), duration=0.3, warmup=0.0)
    [r] = await run_loadtest_async(cfg)
    assert r.ok == 0 and r.errors.get("NOT_FOUND", 0) > 0 and math.isnan(r.p50_ms)
    with pytest.raises(ValueError):
        await run_loadtest_async(LoadTestConfig(rpc="top_activations"))


def test_cli_loadtest(server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "l.csv"
    assert main(["-s", server.target, "loadtest", "--rpc", "get_filters", "--concurrency", "1,2",
                 "--duration", "0.3", "--warmup", "0", "--csv", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[0] == "conc" and lines[2].split()[0] == "1" and lines[3].split()[0] == "2"
    assert len(out.read_text().splitlines()) == 3


@pytest.mark.parametrize(("flag", "sent"), [
    ([], [pb.SALIENCY_OUTPUT_HEATMAP, pb.SALIENCY_OUTPUT_PREDICTIONS]),
    (["--outputs", "all"], []),  # the server's default answer, attribution included
    (["--outputs", "attribution"], [pb.SALIENCY_OUTPUT_ATTRIBUTION]),
])
def test_cli_loadtest_outputs(server: FakeServer, flag: list[str], sent: list[int]) -> None:
    assert main(["-s", server.target, "loadtest", "--concurrency", "1", "--duration", "0.2", "--warmup", "0",
                 *flag]) == 0
    assert list(server.rec.requests[-1].outputs) == sent


def test_cli_loadtest_refuses_an_unknown_output(server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["-s", server.target, "loadtest", "--outputs", "heatmap,pictures"])
    assert "choose from attribution" in capsys.readouterr().err
