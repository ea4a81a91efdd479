"""MaximizeUnit through the real server: progress events then one result, settings that reproduce the
image, errors with their status codes, cancellation freeing the job, the SDK's async form and the CLI."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from convlens.client import AsyncClient, Client, Progress, Unit
from convlens.client import _exceptions as exc
from convlens.client._cli import main as cli
from convlens.client._types import MaximizeResult
from convlens.server.launcher import ServerProcess

pytestmark = pytest.mark.slow
MODEL = "efficientnet_lite0"
SMALL = {"size": 64, "steps": 4, "timeout": 120}  # Lite0 at 64 px: a step takes a few ms


def metric(server: ServerProcess, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()))


def test_progress_events_then_one_result(client: Client) -> None:
    events = list(client.stream_maximize_unit(MODEL, 130, preview_every=2, seed=1, **SMALL))
    *progress, result = events
    assert all(isinstance(e, Progress) for e in progress) and isinstance(result, MaximizeResult)
    assert [p.step for p in progress] == [1, 2, 3, 4] and {p.total for p in progress} == {4}
    # one objective: its value under one key (the .proto names the keys), not also under "logit[130]"
    assert all(set(p.objectives) == {"objective"} for p in progress)
    assert [p.preview is not None for p in progress] == [False, True, False, True]
    assert progress[1].preview.size == (64, 64)
    assert result.image.size == (64, 64) and result.image.mode == "RGB"
    assert len(result.predictions) == 5
    assert result.objective == pytest.approx(
        next(p.logit for p in result.predictions if p.class_index == 130), rel=1e-4) \
        if any(p.class_index == 130 for p in result.predictions) else isinstance(result.objective, float)


def test_settings_are_every_default_resolved_and_reproduce_the_image(client: Client) -> None:
    first = client.maximize_unit(MODEL, 1, preset="maco", **SMALL)  # no seed: the server draws one
    s = first.settings
    assert s is not None and s["preset"] == "maco" and s["parameterization"] == "maco"
    assert s["steps"] == 4 and s["size"] == 64 and s["pad"] == 12 and s["learning_rate"] > 0
    again = client.maximize_unit(MODEL, 1, timeout=120, **s)
    a, b = (np.asarray(r.image, dtype=np.int16) for r in (first, again))
    assert np.abs(a - b).max() <= 2  # the same run (float noise from batch companions, PNG rounding)
    other = client.maximize_unit(MODEL, 1, timeout=120, **{**s, "seed": s["seed"] + 1})
    assert np.abs(a - np.asarray(other.image, dtype=np.int16)).max() > 20


def test_presets_and_a_unit_target(client: Client) -> None:
    for preset in ("lecture", "lucid", "maco"):
        r = client.maximize_unit(MODEL, Unit("_blocks.3", 5), preset=preset, seed=0, **SMALL)
        assert r.settings is not None and r.settings["preset"] == preset
    pixel = client.maximize_unit(MODEL, Unit("_blocks.3", 5, 2, 2), preset="lecture", seed=0, **SMALL)
    assert pixel.settings is not None and pixel.settings["parameterization"] == "pixel"
    assert pixel.settings["l2_decay"] == pytest.approx(1e-4) and pixel.settings["blur_every"] == 4


@pytest.mark.parametrize(("options", "code", "field"), [
    ({"steps": 0}, exc.InvalidArgumentError, "steps"),
    ({"steps": 100_000}, exc.InvalidArgumentError, "steps"),
    ({"size": 4096}, exc.InvalidArgumentError, "size"),
    ({"value_percentile": 101.0}, exc.InvalidArgumentError, "value_percentile"),
    ({"preview_every": -1}, exc.InvalidArgumentError, "preview_every"),
])
def test_bad_requests_name_their_field(client: Client, options, code, field) -> None:
    with pytest.raises(code) as info:
        client.maximize_unit(MODEL, 1, timeout=60, **options)
    assert field in [v.field for v in info.value.field_violations] or field in info.value.message


def test_bad_targets(client: Client) -> None:
    with pytest.raises(exc.InvalidArgumentError):
        client.maximize_unit(MODEL, 5000, **SMALL)
    with pytest.raises(exc.NotFoundError):
        client.maximize_unit(MODEL, Unit("no_such_layer", 0), **SMALL)
    with pytest.raises(exc.FailedPreconditionError):
        client.maximize_unit("tinyonnx", 1, **SMALL)


def test_a_caller_that_leaves_mid_run_frees_its_job(client: Client, server: ServerProcess) -> None:
    events = client.stream_maximize_unit(MODEL, 2, steps=4000, size=64, seed=0, timeout=120)
    assert isinstance(next(events), Progress)
    assert metric(server, "convlens_active_jobs", rpc="MaximizeUnit") >= 1
    events.close()  # cancels the call
    end = time.monotonic() + 20
    while metric(server, "convlens_active_jobs", rpc="MaximizeUnit") > 0:
        assert time.monotonic() < end, "the cancelled job never left"
        time.sleep(0.05)
    assert metric(server, "convlens_optimization_steps_total", rpc="MaximizeUnit") > 0
    assert metric(server, "convlens_time_to_first_progress_seconds_count", rpc="MaximizeUnit") > 0


def test_async_client_runs_jobs_concurrently(server: ServerProcess) -> None:
    async def main() -> list[MaximizeResult]:
        async with AsyncClient(server.address, timeout=120) as c:
            seen: list[int] = []
            calls = (c.maximize_unit(MODEL, k, seed=k, on_progress=lambda p: seen.append(p.step), **SMALL)
                     for k in (1, 2, 3))
            results = await asyncio.gather(*calls)
            assert len(seen) == 12
            return list(results)

    results = asyncio.run(main())
    assert [r.settings["seed"] for r in results if r.settings] == [1, 2, 3]


def test_cli_writes_the_image(server: ServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "goldfish.png"
    assert cli(["-s", server.address, "maximize", MODEL, "--target", "1", "--size", "64", "--steps", "3",
                "--seed", "5", "-o", str(out)]) == 0
    assert out.exists()
    captured = capsys.readouterr()
    assert "3/3" in captured.err and "seed=5" in captured.out
    assert cli(["-s", server.address, "maximize", MODEL, "--unit", "_blocks.2:3:1:1", "--size", "64",
                "--steps", "2", "--quiet"]) == 0
    assert cli(["-s", server.address, "maximize", MODEL, "--target", "1", "--steps", "0"]) == 1


@pytest.fixture(scope="module")
def one_job_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("one-job") / "server.log"
    with ServerProcess(["--device", "cpu", "--max-jobs", "1"], log_path=log) as srv:
        yield srv


def test_max_jobs_refuses_a_second_job(one_job_server: ServerProcess) -> None:
    with Client(one_job_server.address, timeout=60) as c:
        events = c.stream_maximize_unit(MODEL, 2, steps=4000, size=64, timeout=120)
        assert isinstance(next(events), Progress)
        with pytest.raises(exc.ResourceExhaustedError):
            c.maximize_unit(MODEL, 3, **SMALL)
        r = c.get_filters(MODEL, "_conv_stem")  # one-shot work goes on beside the running job
        assert r.weights.shape[0] == 32
        events.close()
        end = time.monotonic() + 20
        while True:  # admitted again once the first job left
            try:
                c.maximize_unit(MODEL, 3, **SMALL)
                break
            except exc.ResourceExhaustedError:
                assert time.monotonic() < end
                time.sleep(0.1)


def test_layers_inside_torchscript_are_refused_with_a_reason_but_its_classes_work(client: Client) -> None:
    """A TorchScript model's inner layers refuse forward hooks: MaximizeUnit at a layer and Dream (which
    always reads a layer) answer FAILED_PRECONDITION saying so, not INTERNAL; a class target reads only the
    output and works."""
    photo = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    with pytest.raises(exc.FailedPreconditionError, match="TorchScript"):
        client.maximize_unit("tinyscript", Unit("conv2", 0), **SMALL)
    with pytest.raises(exc.FailedPreconditionError, match="TorchScript"):
        client.dream(photo, "tinyscript", "conv2", octaves=1, steps_per_octave=2, timeout=60)
    result = client.maximize_unit("tinyscript", 1, size=32, steps=2, timeout=60)
    assert result.image.size == (32, 32)
