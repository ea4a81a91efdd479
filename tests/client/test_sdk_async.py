"""AsyncClient mirrors Client over grpc.aio."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from convlens.client import (
    AsyncClient,
    DeadlineExceededError,
    DreamResult,
    InvalidArgumentError,
    NotFoundError,
    Progress,
    Unit,
)

from .fake_server import MODEL, WEIGHTS, FakeServer

RGB = np.random.default_rng(2).integers(0, 256, size=(12, 16, 3), dtype=np.uint8)


async def test_unary_calls(server: FakeServer) -> None:
    async with AsyncClient(server.target, token="tok") as c:
        assert [m.name for m in await c.list_models()] == [MODEL, "tiny_onnx"]
        assert server.rec.metadata[-1]["authorization"] == "Bearer tok"
        assert (await c.get_model(MODEL)).layer("_conv_stem").has_filters
        f = await c.get_filters(MODEL, "_conv_stem")
        np.testing.assert_array_equal(f.weights, WEIGHTS)
        s = await c.saliency(Image.fromarray(RGB), MODEL, target=Unit("_blocks.2", 1, y=0, x=1))
        np.testing.assert_array_equal(server.rec.images[-1], RGB)
        assert s.attribution.shape == (3, 12, 16) and s.target == Unit("_blocks.2", 1, 0, 1)
        top = await c.top_activations(MODEL, "_blocks.2", 1)
        assert top[0].source == "skimage/chelsea.png"
        assert (await c.list_datasets())[0].name == "samples"


async def test_errors(server: FakeServer) -> None:
    async with AsyncClient(server.target) as c:
        with pytest.raises(InvalidArgumentError) as e:
            await c.saliency(RGB, "bad")
        assert e.value.field_violations[0] == ("target.unit.layer", "no layer 'nope'")
        with pytest.raises(NotFoundError):
            await c.maximize_unit("missing", 3)
        with pytest.raises(ValueError):
            await c.saliency(RGB, MODEL, method="nope")
        with pytest.raises(DeadlineExceededError):
            await c.saliency(RGB, "slow", timeout=0.2)


async def test_streams(server: FakeServer) -> None:
    seen: list[int] = []

    async def on_progress(p: Progress) -> None:  # async callbacks are awaited
        seen.append(p.step)

    async with AsyncClient(server.target) as c:
        r = await c.maximize_unit(MODEL, 281, on_progress=on_progress)
        assert seen == [1, 2, 3] and r.objective == 7.0
        events = [e async for e in c.stream_dream(RGB, MODEL, "_blocks.4")]
        assert [type(e) for e in events] == [Progress] * 3 + [DreamResult]
        steps: list[int] = []
        st = await c.style_transfer(RGB, RGB, MODEL, on_progress=lambda p: steps.append(p.step))
        assert steps == [1, 2, 3] and st.content_loss == 0.25
