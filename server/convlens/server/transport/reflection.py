"""Server reflection, v1 beside v1alpha.

grpcio-reflection (1.85) implements only grpc.reflection.v1alpha. The v1 service (what grpcurl, Postman and
recent grpc-js tools ask first) has the same messages with the same field numbers under a new package name,
so one servicer answers both: v1 requests parse as v1alpha messages byte for byte, and v1alpha answers
serialise to valid v1 answers. ListServices names both reflection services; `file_containing_symbol` of the
v1 service itself answers NOT_FOUND (its descriptor is not shipped in Python).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

V1ALPHA = reflection.SERVICE_NAME  # "grpc.reflection.v1alpha.ServerReflection"
V1 = "grpc.reflection.v1.ServerReflection"


def enable_reflection(server: Any, service_names: Iterable[str]) -> None:
    """Serve reflection for `service_names` (plus both reflection services) under v1alpha and v1, on a
    grpc.aio.Server (or a wrapper of one)."""
    servicer = reflection.aio.ReflectionServicer((*service_names, V1ALPHA, V1))
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(V1, {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString),
    }),))
