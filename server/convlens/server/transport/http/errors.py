"""Statuses as HTTP answers: Connect's error body and its code -> HTTP status table.

`{"code": "invalid_argument", "message": "...", "details": [{"type": "google.rpc.BadRequest", "value":
"<base64 of the message>", "debug": {"fieldViolations": [...]}}]}` — `type`/`value` as Connect sends them
(so Connect clients decode the details), `debug` the same detail as proto3 JSON for people and curl.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from typing import Any

import grpc
from google.protobuf import json_format
from google.rpc import status_pb2

STATUS_DETAILS_KEY = "grpc-status-details-bin"

# https://connectrpc.com/docs/protocol/#error-codes
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}


def code_name(code: grpc.StatusCode) -> str:
    """Connect's spelling: lower snake case, and `canceled` with one l."""
    return "canceled" if code == grpc.StatusCode.CANCELLED else code.name.lower()


def error_body(code: grpc.StatusCode, message: str, trailing: Iterable[tuple[str, Any]] = ()) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code_name(code), "message": message}
    details = []
    for key, value in trailing:
        if key != STATUS_DETAILS_KEY:
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            entry: dict[str, Any] = {"type": detail.TypeName(),
                                     "value": base64.b64encode(detail.value).decode().rstrip("=")}
            try:
                debug = json_format.MessageToDict(detail)
                debug.pop("@type", None)
                entry["debug"] = debug
            except (TypeError, KeyError):  # a detail type this process does not know: type and value only
                pass
            details.append(entry)
    if details:
        body["details"] = details
    return body


def headers_from(trailing: Iterable[tuple[str, Any]]) -> dict[str, str]:
    """Trailing metadata worth an HTTP header (text values; the binary status details go in the body)."""
    return {k: v for k, v in trailing if not k.endswith("-bin") and isinstance(v, str)}
