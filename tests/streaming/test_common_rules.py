"""The rules MaximizeUnit, Dream and StyleTransfer share (service/streaming.py), pinned on all three at once:
a negative preview_every is INVALID_ARGUMENT naming the field, a forward-only model is FAILED_PRECONDITION
worded alike, and both are refused before admission (with the one job slot taken they are still answered
so, not RESOURCE_EXHAUSTED); previews come every n steps (MaximizeUnit's also at the last step)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import pytest

from convlens.client import AsyncClient, Progress
from convlens.client import _exceptions as exc
from convlens.server.app import ConvLensServer
from convlens.server.config import ServerConfig
from convlens.server.models.repository import ModelRepository
from convlens.server.service.streaming import wants_preview

from .conftest import MODEL, photo, tiny_model

FORWARD_ONLY = "tinyforward"

# One call per RPC, small enough to finish in a few steps; `model` and options are the caller's.
Call = Callable[[AsyncClient, str, dict[str, Any]], AsyncIterator[Any]]
CALLS: dict[str, Call] = {
    "MaximizeUnit": lambda c, model, o: c.stream_maximize_unit(model, 1, steps=4, size=32, pad=0, jitter=0,
                                                                seed=1, **o),
    "Dream": lambda c, model, o: c.stream_dream(photo(), model, "stage1", octaves=1, steps_per_octave=4,
                                                max_size=32, **o),
    "StyleTransfer": lambda c, model, o: c.stream_style_transfer(photo(), photo(seed=3), model, steps=4,
                                                                 size=32, **o),
}


@pytest.fixture()
async def server() -> AsyncIterator[ConvLensServer]:
    """The tiny model twice: as is, and served forward-only (what an ONNX model is here)."""
    forward_only = replace(tiny_model(), name=FORWARD_ONLY, supports_gradients=False)
    srv = ConvLensServer(ServerConfig(host="127.0.0.1", port=0, metrics=False, embedded=False, device="cpu",
                                      max_jobs=1, grace_seconds=0.0),
                         repository=ModelRepository([tiny_model(), forward_only]))
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop(0.0)


async def drain(stream: AsyncIterator[Any]) -> list[Any]:
    return [event async for event in stream]


@asynccontextmanager
async def slot_taken(client: AsyncClient) -> AsyncIterator[None]:
    """The server's only job slot held by a long dream (it has sent its first step) for the block."""
    stream = client.stream_dream(photo(), MODEL, "stage1", octaves=1, steps_per_octave=200, max_size=32)
    assert isinstance(await stream.__anext__(), Progress)  # type: ignore[attr-defined]
    try:
        yield
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


@pytest.mark.parametrize("rpc", list(CALLS))
async def test_negative_preview_every_is_invalid_argument_on_every_rpc(client: AsyncClient, rpc: str) -> None:
    async with slot_taken(client):
        with pytest.raises(exc.InvalidArgumentError) as e:
            await drain(CALLS[rpc](client, MODEL, {"preview_every": -1}))
    assert [f for f, _ in e.value.field_violations] == ["preview_every"]
    assert "preview_every = -1 is negative" in str(e.value)


@pytest.mark.parametrize("rpc", list(CALLS))
async def test_forward_only_models_are_refused_alike(client: AsyncClient, rpc: str) -> None:
    async with slot_taken(client):
        with pytest.raises(exc.FailedPreconditionError) as e:
            await drain(CALLS[rpc](client, FORWARD_ONLY, {}))
    assert f"model '{FORWARD_ONLY}' is served in the embedded format, which runs forward-only here; {rpc} " \
           "needs gradients" in str(e.value)


@pytest.mark.parametrize(("rpc", "previewed"), [("MaximizeUnit", [2, 4]), ("Dream", [2]), ("StyleTransfer", [2])])
async def test_previews_every_n_steps(client: AsyncClient, rpc: str, previewed: list[int]) -> None:
    events = await drain(CALLS[rpc](client, MODEL, {"preview_every": 2}))
    progress = [e for e in events if isinstance(e, Progress)]
    assert [p.step for p in progress] == [1, 2, 3, 4] and len(events) == 5
    assert [p.step for p in progress if p.preview is not None] == previewed
    assert all(p.preview.size == events[-1].image.size for p in progress if p.preview is not None)


def test_the_preview_rule() -> None:
    """Computed by hand for 7 steps: every 3rd, the last only when asked; 0 is none."""
    assert [s for s in range(1, 8) if wants_preview(3, s, 7)] == [3, 6]
    assert [s for s in range(1, 8) if wants_preview(3, s, 7, last=True)] == [3, 6, 7]
    assert [s for s in range(1, 8) if wants_preview(0, s, 7, last=True)] == []
