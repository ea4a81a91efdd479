"""One server interceptor: counts and times every RPC, and turns domain errors into statuses."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc
from grpc.aio import AbortError, ServerInterceptor

from convlens.server.metrics import Metrics
from convlens.server.transport.status import to_status


class ServiceInterceptor(ServerInterceptor):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        service, _, method = details.method.lstrip("/").rpartition("/")
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, service, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(handler.unary_stream, service, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler  # stream-request RPCs: none in this service (health Watch is unary_stream)

    @asynccontextmanager
    async def _observed(self, kind: str, service: str, method: str,
                        context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        """Count and time the call; turn any exception from its body into the caller's status."""
        self.metrics.started.labels(kind, service, method).inc()
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            yield
        except AbortError:
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:  # every failure is reported as a status
            status = to_status(exc)
            code = status.code
            await context.abort_with_status(status)
        finally:
            self.metrics.handled.labels(kind, service, method, code.name).inc()
            self.metrics.handling_seconds.labels(kind, service, method).observe(time.perf_counter() - started)

    def _unary(self, behavior: Callable[..., Any], service: str, method: str) -> Callable[..., Any]:
        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with self._observed("unary", service, method, context):
                return await behavior(request, context)
        return wrapper

    def _stream(self, behavior: Callable[..., Any], service: str, method: str) -> Callable[..., Any]:
        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with self._observed("server_stream", service, method, context):
                async for response in behavior(request, context):
                    yield response
        return wrapper
