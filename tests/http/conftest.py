"""An in-process ConvLens server with the HTTP front on (tiny network, free ports), its gRPC stub and an
HTTP client on the same loop: answers over both protocols come from one server and can be compared."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from PIL import Image

from convlens.server.app import ConvLensServer
from convlens.server.config import ServerConfig
from convlens.server.models.repository import ModelRepository
from convlens.v1 import convlens_pb2_grpc as pb_grpc
from tests.streaming.conftest import MODEL, photo, tiny_model

__all__ = ["MODEL", "Front", "png", "photo", "sse_events"]


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def sse_events(text: str) -> list[tuple[str, dict[str, Any]]]:
    """(event, data) pairs of a text/event-stream body."""
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields["event"], json.loads(fields["data"])))
    return events


@dataclass
class Front:
    server: ConvLensServer
    stub: pb_grpc.InspectionServiceStub
    http: httpx.AsyncClient


async def start_front(tmp_path: Path, **config: Any) -> ConvLensServer:
    srv = ConvLensServer(ServerConfig(host="127.0.0.1", port=0, metrics=False, embedded=False, device="cpu",
                                      grace_seconds=0.0, http_port=0, index_dir=tmp_path / "index", **config),
                         repository=ModelRepository([tiny_model()]))
    await srv.start()
    return srv


@pytest.fixture()
async def front(tmp_path: Path) -> AsyncIterator[Front]:
    srv = await start_front(tmp_path)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as channel, \
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{srv.http_port}", timeout=60) as http:
            yield Front(srv, pb_grpc.InspectionServiceStub(channel), http)
    finally:
        await srv.stop(0.0)
