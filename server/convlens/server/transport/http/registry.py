"""What the gRPC server serves, recorded as it is registered, so the HTTP front can serve the same handlers.

`RecordingServer` stands in for the grpc.aio server while services are added (`add_*Servicer_to_server`
calls `add_generic_rpc_handlers`); everything else passes through to the real server. A service added to
the server later (another `add_*_to_server` call in app.py) is therefore on HTTP too, with no route written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import MethodDescriptor

# Services of the contract's packages are served over HTTP; health and reflection stay gRPC-only (HTTP has its
# own readiness routes, and reflection is a bidirectional stream).
CONTRACT_PACKAGE_PREFIX = "convlens."


class _Details(grpc.HandlerCallDetails):
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


@dataclass(frozen=True)
class Method:
    """One RPC as the HTTP front serves it: its descriptor, message classes and the servicer's handler."""

    path: str  # "/convlens.v1.InspectionService/Saliency"
    descriptor: MethodDescriptor
    request_class: Any
    response_class: Any
    handler: grpc.RpcMethodHandler

    @property
    def streaming(self) -> bool:
        return bool(self.descriptor.server_streaming)


class RecordingServer:
    """A grpc.aio.Server that remembers the generic handlers added to it."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server
        self.generic_handlers: list[grpc.GenericRpcHandler] = []

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self.generic_handlers.extend(handlers)
        self._server.add_generic_rpc_handlers(handlers)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)

    def methods(self) -> list[Method]:
        """Every unary and server-streaming method of the contract's services that has a handler."""
        pool = descriptor_pool.Default()
        found = []
        for generic in self.generic_handlers:
            name_of = getattr(generic, "service_name", None)
            name = name_of() if name_of is not None else None
            if not name or not name.startswith(CONTRACT_PACKAGE_PREFIX):
                continue
            try:
                service = pool.FindServiceByName(name)
            except KeyError:
                continue
            for method in service.methods:
                if method.client_streaming:
                    continue
                path = f"/{service.full_name}/{method.name}"
                handler = generic.service(_Details(path))
                if handler is None:
                    continue
                found.append(Method(path, method, message_factory.GetMessageClass(method.input_type),
                                    message_factory.GetMessageClass(method.output_type), handler))
        return found


# It is a grpc.aio.Server to those who ask: grpc_reflection registers its asyncio servicer only on a server for
# which isinstance(server, grpc.aio.Server) holds (otherwise the sync one, which fails on an aio server).
grpc.aio.Server.register(RecordingServer)
