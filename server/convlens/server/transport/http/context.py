"""A grpc.aio.ServicerContext for a call that came over HTTP: what the interceptor and handlers use of one.

Metadata are the request's headers (lower-case names, so `authorization` and `x-request-id` are read as over
gRPC); the deadline comes from `connect-timeout-ms` or `grpc-timeout`; `abort` records the status and raises
grpc's AbortError, as grpc.aio does, so the interceptor's own error path runs unchanged.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence
from typing import Any

import grpc
from grpc.aio import AbortError

from convlens.server.errors import InvalidArgument

_GRPC_TIMEOUT = re.compile(r"^(\d{1,8})([HMSmun])$")
_GRPC_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def timeout_seconds(headers: Any) -> float | None:
    """`connect-timeout-ms: 5000` (Connect) or `grpc-timeout: 5S` (gRPC's format); None when neither."""
    connect = headers.get("connect-timeout-ms")
    if connect is not None:
        if not connect.strip().isdigit() or len(connect.strip()) > 10:
            raise InvalidArgument(f"connect-timeout-ms must be a positive integer of milliseconds, got {connect!r}",
                                  field="connect-timeout-ms")
        return int(connect) / 1000
    grpc_timeout = headers.get("grpc-timeout")
    if grpc_timeout is not None:
        m = _GRPC_TIMEOUT.match(grpc_timeout.strip())
        if m is None:
            raise InvalidArgument(f"grpc-timeout must be up to 8 digits and a unit (H, M, S, m, u, n), e.g. 5S; "
                                  f"got {grpc_timeout!r}", field="grpc-timeout")
        return int(m.group(1)) * _GRPC_UNITS[m.group(2)]
    return None


def peer(client: Sequence[Any] | None) -> str:
    """grpc's peer format (`ipv4:127.0.0.1:5000`, `ipv6:[::1]:5000`) for an ASGI scope's client."""
    if not client:
        return "unknown"
    host, port = client[0], client[1]
    return f"ipv6:[{host}]:{port}" if ":" in str(host) else f"ipv4:{host}:{port}"


class HttpContext:
    def __init__(self, metadata: Iterable[tuple[str, str]], peer: str, timeout: float | None) -> None:
        self._metadata = tuple(metadata)
        self._peer = peer
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self.trailing: tuple[tuple[str, str | bytes], ...] = ()

    # ------------------------------------------------------------------ what handlers read
    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def peer(self) -> str:
        return self._peer

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(self._deadline - time.monotonic(), 0.0)

    def cancelled(self) -> bool:
        return False

    # ------------------------------------------------------------------ what handlers set
    def set_trailing_metadata(self, metadata: Sequence[tuple[str, str | bytes]]) -> None:
        self.trailing = tuple(metadata)

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self.trailing

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details

    async def abort(self, code: grpc.StatusCode, details: str = "",
                    trailing_metadata: Sequence[tuple[str, str | bytes]] = ()) -> None:
        self._code, self._details = code, details
        if trailing_metadata:
            self.trailing = tuple(trailing_metadata)
        raise AbortError(f"{code.name}: {details}")
