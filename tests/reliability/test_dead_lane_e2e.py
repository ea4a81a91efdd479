"""A compute thread that dies, seen by a caller (issue #15): a plain grpc caller gets UNAVAILABLE (retryable),
the SDK's retry policy turns it into a success without the caller noticing, the server stays SERVING and
counts the restart. The fault is real: CONVLENS_TEST_FAULTS=lane_dies=1 raises SystemExit on the lane's
thread during the first batch (scheduler/memory.py), which ends that thread."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from convlens.client import AsyncClient
from convlens.server.app import ConvLensServer
from convlens.server.config import ServerConfig
from convlens.server.models.repository import ModelRepository
from convlens.server.scheduler.memory import FAULTS_ENV
from convlens.v1 import convlens_pb2 as pb
from convlens.v1 import convlens_pb2_grpc as pb_grpc
from convlens.wire.tensors import to_tensor
from tests.streaming.conftest import MODEL, photo, tiny_model


@pytest.fixture()
async def dying_server(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ConvLensServer]:
    monkeypatch.setenv(FAULTS_ENV, "lane_dies=1")  # read when the workers are made
    srv = ConvLensServer(ServerConfig(host="127.0.0.1", port=0, metrics=False, embedded=False, device="cpu",
                                      grace_seconds=0.0), repository=ModelRepository([tiny_model()]))
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop(0.0)


def lane_restarts(srv: ConvLensServer) -> float:
    return sum(s.value for m in srv.metrics.registry.collect() if m.name == "convlens_worker_lane_restarts"
               for s in m.samples if s.name.endswith("_total"))


def request() -> pb.SaliencyRequest:
    return pb.SaliencyRequest(model=MODEL, image=pb.Image(tensor=to_tensor(photo(32, 32))),
                              target=pb.Target(class_index=3))


async def test_a_plain_caller_gets_unavailable_then_success_and_the_server_stays_serving(
        dying_server: ConvLensServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{dying_server.port}") as channel:
        stub = pb_grpc.InspectionServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Saliency(request(), timeout=60)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
        assert "died" in (info.value.details() or "") and "retry" in (info.value.details() or "")
        assert lane_restarts(dying_server) == 1
        again = await stub.Saliency(request(), timeout=60)  # the fresh lane serves it
        assert again.target.class_index == 3 and list(again.attribution.shape) == [3, 32, 32]
        assert lane_restarts(dying_server) == 1
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                                 timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_the_sdk_retries_it_and_the_caller_never_sees_it(dying_server: ConvLensServer) -> None:
    async with AsyncClient(f"127.0.0.1:{dying_server.port}", timeout=60) as client:
        first = await client.saliency(photo(32, 32), MODEL, target=3)
        alone = await client.saliency(photo(32, 32), MODEL, target=3)
    assert lane_restarts(dying_server) == 1  # the first attempt died with its thread; the retry was served
    np.testing.assert_allclose(first.attribution, alone.attribution, rtol=1e-5, atol=1e-7)
