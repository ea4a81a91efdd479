"""An in-process grpc.aio server with the real interceptor and a scripted servicer, for drain/auth/log tests
that need exact timing control (a slow unary call, a long progress stream) without torch."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from PIL import Image

from convlens.server.metrics import Metrics
from convlens.server.transport.access_log import AccessLog
from convlens.server.transport.auth import TokenAuth
from convlens.server.transport.drain import Drain
from convlens.server.transport.interceptor import ServiceInterceptor
from convlens.v1 import convlens_pb2 as pb
from convlens.v1 import convlens_pb2_grpc as pb_grpc


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


_TINY_PNG = _png(np.zeros((2, 2, 3), dtype=np.uint8))


class ScriptedServicer(pb_grpc.InspectionServiceServicer):
    """GetModel sleeps `request.model` seconds (e.g. "0.3"); MaximizeUnit streams `steps` progress events,
    `step_s` apart, then a result, and ends `after_result_s` later (a real job still releases its state
    then). `started` counts calls that reached the servicer."""

    def __init__(self, steps: int = 20, step_s: float = 0.05, after_result_s: float = 0.0) -> None:
        self.steps, self.step_s, self.after_result_s = steps, step_s, after_result_s
        self.started = 0
        self.entered = asyncio.Event()

    async def ListModels(self, request: pb.ListModelsRequest, context: object) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[pb.ModelInfo(name="m")])

    async def GetModel(self, request: pb.GetModelRequest, context: object) -> pb.GetModelResponse:
        self.started += 1
        self.entered.set()
        await asyncio.sleep(float(request.model))
        return pb.GetModelResponse(model=pb.ModelInfo(name=request.model))

    async def MaximizeUnit(self, request: pb.MaximizeUnitRequest, context: object
                           ) -> AsyncIterator[pb.MaximizeUnitResponse]:
        self.started += 1
        self.entered.set()
        for i in range(1, self.steps + 1):
            await asyncio.sleep(self.step_s)
            yield pb.MaximizeUnitResponse(progress=pb.Progress(step=i, total_steps=self.steps))
        yield pb.MaximizeUnitResponse(result=pb.MaximizeUnitResult(objective=1.0, image_png=_TINY_PNG))
        await asyncio.sleep(self.after_result_s)


class InProcessServer:
    def __init__(self, *, auth: TokenAuth | None = None, access_log: AccessLog | None = None,
                 servicer: ScriptedServicer | None = None) -> None:
        self.metrics = Metrics()
        self.drain = Drain()
        self.servicer = servicer or ScriptedServicer()
        self.health = health_aio.HealthServicer()
        self.server = grpc.aio.server(interceptors=[ServiceInterceptor(
            self.metrics, auth=auth, access_log=access_log, drain=self.drain)])
        pb_grpc.add_InspectionServiceServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def __aenter__(self) -> InProcessServer:
        await self.server.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.stop(0)

    async def shut_down(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.drain.shut_down(self.server, grace)
