"""AsyncClient.health answers what the blocking Client's does, from the same server."""

from __future__ import annotations

import asyncio

import pytest

from convlens.client import AsyncClient, Client
from convlens.client._exceptions import NotFoundError
from convlens.server.app import ConvLensServer


async def test_health_of_the_server_and_the_service(client: AsyncClient, server: ConvLensServer) -> None:
    assert await client.health() == "SERVING"
    assert await client.health("convlens.v1.InspectionService") == "SERVING"
    with Client(f"127.0.0.1:{server.port}", timeout=30) as blocking:
        assert await asyncio.to_thread(blocking.health) == await client.health()


async def test_an_unknown_service_is_not_found(client: AsyncClient) -> None:
    with pytest.raises(NotFoundError):
        await client.health("no.such.Service")
