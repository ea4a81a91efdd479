"""Dream and StyleTransfer end to end over gRPC (in-process server, tiny network): progress then one
result, the same image alone and batched with other callers, cancellation frees the job, and every bad
request gets its status code and the field it concerns."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convlens.client import AsyncClient, Client, Progress
from convlens.client import _exceptions as exc
from convlens.client._cli import main
from convlens.server.app import ConvLensServer
from convlens.server.errors import InvalidArgument
from convlens.server.transport.codecs import style as style_codec
from convlens.v1 import convlens_pb2 as pb

from .conftest import MODEL, photo

DREAM = dict(octaves=2, steps_per_octave=3, jitter=4, max_size=48)
STYLE = dict(steps=6, size=40, style_weight=1e4, learning_rate=1.0)


def pixels(image: object) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def batched_steps(server: ConvLensServer, rpc: str) -> float:
    """Steps computed in batches of more than one job, from the server's step-batch histogram."""
    hist = server.metrics.step_batch_size
    metric = hist.labels(model=MODEL, rpc=rpc)
    buckets = {float(s.labels["le"]): s.value for m in metric.collect() for s in m.samples
               if s.name.endswith("_bucket")}
    return buckets[float("inf")] - buckets.get(1.0, 0.0)


async def test_dream_streams_progress_then_one_result(client: AsyncClient) -> None:
    events = [e async for e in client.stream_dream(photo(), MODEL, "stage1", preview_every=2, seed=1, **DREAM)]
    progress, results = events[:-1], events[-1:]
    assert all(isinstance(e, Progress) for e in progress) and not isinstance(results[0], Progress)
    assert [p.step for p in progress] == list(range(1, 7)) and {p.total for p in progress} == {6}
    assert all("objective" in p.objectives for p in progress)
    assert [p.step for p in progress if p.preview is not None] == [2, 4]
    result = results[0]
    assert result.image.size == (48, 48) and result.image.mode == "RGB"
    assert result.settings["layer"] == "stage1" and result.settings["octaves"] == 2
    assert result.settings["jitter"] == 4 and result.settings["seed"] == 1 and "channel" not in result.settings
    assert result.objective > result.input_objective > 0


async def test_dream_defaults_the_layer_and_guides(client: AsyncClient) -> None:
    result = await client.dream(photo(), MODEL, guide=photo(seed=9), **DREAM)
    assert result.settings["guided"] and result.settings["layer"]  # the model's default layer
    assert result.objective > result.input_objective


async def test_dream_same_alone_and_batched(client: AsyncClient, server: ConvLensServer) -> None:
    alone = await client.dream(photo(seed=1), MODEL, "stage1", seed=5, **DREAM)
    before = batched_steps(server, "Dream")
    together = await asyncio.gather(*(client.dream(photo(seed=s), MODEL, "stage1", seed=s + 4, **DREAM)
                                      for s in (1, 2, 3)))
    assert batched_steps(server, "Dream") > before  # the three really shared steps
    diff = np.abs(pixels(alone.image) - pixels(together[0].image))
    assert diff.max() <= 2 and diff.mean() < 0.05  # rounding in batched convolutions, then uint8
    assert np.abs(pixels(together[0].image) - pixels(together[1].image)).mean() > 10


async def test_style_streams_progress_then_one_result(client: AsyncClient) -> None:
    events = [e async for e in client.stream_style_transfer(photo(40, 60), photo(seed=3), MODEL, preview_every=3,
                                                             **STYLE)]
    assert [e.step for e in events[:-1]] == list(range(1, 7))
    assert all({"style", "content", "total"} <= set(e.objectives) for e in events[:-1])
    assert [e.step for e in events[:-1] if e.preview is not None] == [3]
    result = events[-1]
    assert result.image.size == (40, 27)  # longest side `size`, the content's aspect
    assert 0 < result.style_loss < result.initial_style_loss
    assert result.settings["optimizer"] == "adam" and result.settings["soften"] in ("none", "channels",
                                                                                   "positions", "all")
    assert result.settings["style_layers"] and result.settings["content_layer"]
    assert result.total_loss == pytest.approx(result.settings["style_weight"] * result.style_loss
                                              + result.settings["content_weight"] * result.content_loss, rel=1e-3)


async def test_style_adam_same_alone_and_batched(client: AsyncClient, server: ConvLensServer) -> None:
    opts = dict(STYLE, init="noise", seed=7)
    alone = await client.style_transfer(photo(seed=1), photo(seed=2), MODEL, **opts)
    before = batched_steps(server, "StyleTransfer")
    together = await asyncio.gather(
        client.style_transfer(photo(seed=1), photo(seed=2), MODEL, **opts),
        client.style_transfer(photo(seed=3), photo(seed=4), MODEL, **dict(opts, soften="channels")),
        client.style_transfer(photo(seed=5), photo(seed=6), MODEL, **dict(opts, init="content")))
    assert batched_steps(server, "StyleTransfer") > before
    diff = np.abs(pixels(alone.image) - pixels(together[0].image))
    assert diff.max() <= 2 and diff.mean() < 0.05
    assert alone.style_loss == pytest.approx(together[0].style_loss, rel=1e-3)


async def test_style_distance_is_asked_for_and_reported(client: AsyncClient) -> None:
    """The two distances are different losses on the same images; the settings say which one ran."""
    opts = dict(STYLE, init="content", seed=3)
    mse = await client.style_transfer(photo(seed=1), photo(seed=2), MODEL, style_distance="mse", **opts)
    relative = await client.style_transfer(photo(seed=1), photo(seed=2), MODEL, style_distance="relative", **opts)
    assert mse.settings["style_distance"] == "mse" and relative.settings["style_distance"] == "relative"
    assert relative.initial_style_loss != pytest.approx(mse.initial_style_loss, rel=1e-2)
    default = await client.style_transfer(photo(seed=1), photo(seed=2), MODEL, **opts)
    assert default.settings["style_distance"] == "mse"  # a model without a table entry: Gatys' distance
    with pytest.raises(ValueError, match="style_distance"):  # the SDK knows the names
        await client.style_transfer(photo(seed=1), photo(seed=2), MODEL, style_distance="cosine", **opts)
    with pytest.raises(InvalidArgument) as refused:  # and the server the values
        style_codec.query(pb.StyleTransferRequest(model=MODEL, style_distance=7))
    assert [v.field for v in refused.value.violations] == ["style_distance"]


async def test_lbfgs_runs_and_reports_it(client: AsyncClient) -> None:
    result = await client.style_transfer(photo(), photo(seed=2), MODEL, optimizer="lbfgs", steps=4, size=32)
    assert result.settings["optimizer"] == "lbfgs" and result.style_loss < result.initial_style_loss


async def test_cancel_mid_run_frees_the_job(client: AsyncClient, server: ConvLensServer) -> None:
    stream = client.stream_dream(photo(), MODEL, "stage1", octaves=1, steps_per_octave=200, max_size=48)
    seen = 0
    async for _event in stream:
        seen += 1
        if seen == 2:
            break
    await stream.aclose()  # type: ignore[attr-defined]
    scheduler = server._scheduler
    assert scheduler is not None
    for _ in range(250):
        if scheduler.active_jobs() == 0:
            break
        await asyncio.sleep(0.02)
    steps = server.metrics.steps.labels(model=MODEL, rpc="Dream")._value.get()
    assert scheduler.active_jobs() == 0 and steps < 100  # freed mid-run, not finished


@pytest.mark.parametrize("server", [1], indirect=True)
async def test_too_many_jobs_is_resource_exhausted(client: AsyncClient) -> None:
    stream = client.stream_dream(photo(), MODEL, "stage1", octaves=1, steps_per_octave=200, max_size=48)
    first = await stream.__anext__()  # type: ignore[attr-defined]
    assert isinstance(first, Progress)
    with pytest.raises(exc.ResourceExhaustedError):
        await client.style_transfer(photo(), photo(), MODEL, steps=2, size=32)
    await stream.aclose()  # type: ignore[attr-defined]


def fields(err: exc.ConvLensError) -> list[str]:
    return [f for f, _ in err.field_violations]


@pytest.mark.parametrize(("options", "field"), [
    (dict(octaves=99), "octaves"), (dict(steps_per_octave=10_000), "steps_per_octave"),
    (dict(max_size=100_000), "max_size"), (dict(octave_scale=0.5), "octave_scale"), (dict(jitter=-1), "jitter"),
    (dict(channel=99), "channel"), (dict(layer="_nope"), "layer"),
])
async def test_dream_limits_are_invalid_argument(client: AsyncClient, options: dict, field: str) -> None:
    layer = options.pop("layer", "stage1")
    with pytest.raises((exc.InvalidArgumentError, exc.NotFoundError)) as e:
        await client.dream(photo(), MODEL, layer, **options)
    assert fields(e.value) == [field]


@pytest.mark.parametrize(("options", "field"), [
    (dict(steps=100_000), "steps"), (dict(size=8), "size"), (dict(temperature=0.0), "temperature"),
    (dict(style_layers=["stage1"], style_layer_weights=[1.0, 2.0]), "style_layer_weights"),
    (dict(style_layers=["_fc"]), "style_layers"), (dict(content_layer="nope"), "content_layer"),
])
async def test_style_limits_are_invalid_argument(client: AsyncClient, options: dict, field: str) -> None:
    with pytest.raises((exc.InvalidArgumentError, exc.NotFoundError)) as e:
        await client.style_transfer(photo(), photo(), MODEL, **options)
    assert fields(e.value) == [field]


async def test_an_unknown_layer_is_reported_with_the_other_bad_fields(client: AsyncClient) -> None:
    """Dream collects its layer as StyleTransfer collects its layers: one answer names every bad field. The
    status is the one an unknown layer always had, NOT_FOUND (LAYER_NOT_FOUND), on both RPCs."""
    with pytest.raises(exc.NotFoundError) as e:
        await client.dream(photo(), MODEL, "_nope", octave_scale=0.5, jitter=-1)
    assert e.value.reason == "LAYER_NOT_FOUND" and fields(e.value) == ["layer", "octave_scale", "jitter"]
    assert "no layer '_nope'" in str(e.value) and "(and 2 more" in str(e.value)
    with pytest.raises(exc.NotFoundError) as e:
        await client.style_transfer(photo(), photo(), MODEL, content_layer="nope", steps=100_000)
    assert e.value.reason == "LAYER_NOT_FOUND" and fields(e.value) == ["steps", "content_layer"]


async def test_bad_images_name_their_field(client: AsyncClient) -> None:
    with pytest.raises(exc.InvalidArgumentError) as e:
        await client.style_transfer(photo(), b"not an image", MODEL, steps=1)
    assert fields(e.value) == ["style"]
    with pytest.raises(exc.InvalidArgumentError) as e:
        await client.dream(b"\x89PNG broken", MODEL, "stage1")
    assert fields(e.value) == ["image"]
    with pytest.raises(exc.InvalidArgumentError) as e:
        await client.dream(photo(), MODEL, "stage1", guide=b"nope")
    assert fields(e.value) == ["guide"]


async def test_sync_client_and_progress_callback(server: ConvLensServer) -> None:
    def run() -> tuple[list[int], object]:
        seen: list[int] = []
        with Client(f"127.0.0.1:{server.port}", timeout=60) as c:
            result = c.dream(photo(), MODEL, "stage1", on_progress=lambda p: seen.append(p.step), **DREAM)
        return seen, result

    seen, result = await asyncio.to_thread(run)
    assert seen == list(range(1, 7)) and result.image.size == (48, 48)  # type: ignore[attr-defined]


async def test_cli_dream_and_style_write_pictures(server: ConvLensServer, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    content, style_image = tmp_path / "content.png", tmp_path / "style.png"
    Image.fromarray(photo()).save(content)
    Image.fromarray(photo(seed=4)).save(style_image)
    address = f"127.0.0.1:{server.port}"
    rc = await asyncio.to_thread(main, ["-s", address, "dream", str(content), "-m", MODEL, "--layer", "stage1",
                                        "--octaves", "2", "--steps", "2", "--max-size", "48",
                                        "-o", str(tmp_path / "dream.png")])
    assert rc == 0
    with Image.open(tmp_path / "dream.png") as picture:  # closed here, not at garbage collection
        assert picture.size == (48, 48)
    rc = await asyncio.to_thread(main, ["-s", address, "style", str(content), str(style_image), "-m", MODEL,
                                        "--steps", "3", "--size", "32", "--soften", "channels",
                                        "-o", str(tmp_path / "styled.png")])
    assert rc == 0
    with Image.open(tmp_path / "styled.png") as picture:  # closed here, not at garbage collection
        assert picture.size == (32, 32)
    out = capsys.readouterr()
    assert "4/4" in out.err and "3/3" in out.err and "style" in out.err  # the progress bars
    assert "soften=channels" in out.out and "layer=stage1" in out.out
