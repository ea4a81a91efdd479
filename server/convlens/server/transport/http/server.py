"""The HTTP front's listener: a Starlette app served by uvicorn inside the gRPC server's event loop.

uvicorn's `Server.startup()`/`shutdown()` are used directly (not `serve()`): the process's own signal
handling and drain stay in charge (app.py), and nothing runs a second loop or thread.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from convlens.server.transport.http.errors import error_body
from convlens.server.transport.http.kserve import SALIENCY_PATH, KServeRoutes
from convlens.server.transport.http.registry import Method
from convlens.server.transport.http.rpc import RpcRoutes
from convlens.server.transport.interceptor import ServiceInterceptor

log = logging.getLogger("convlens.server")


@dataclass(frozen=True)
class HttpSettings:
    host: str = "[::]"
    port: int = 8080  # 0: any free port
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    aliases: Mapping[str, str] = field(default_factory=dict)  # KServe model name -> served model


async def _not_found(request: Request, exc: Exception) -> Response:
    """Unknown paths and methods answer in the same JSON as every other error."""
    status = exc.status_code if isinstance(exc, HTTPException) else 404
    code = grpc.StatusCode.UNIMPLEMENTED if status == 405 else grpc.StatusCode.NOT_FOUND
    return JSONResponse(error_body(code, f"{request.method} {request.url.path}: no such route (RPCs are "
                                         "POST /<package>.<Service>/<Method>; KServe: /v1/models/NAME[:explain])"),
                        status_code=status)


def build_app(methods: list[Method], interceptor: ServiceInterceptor, models: Callable[[], list[str]],
              ready: Callable[[], bool], aliases: Mapping[str, str]) -> Starlette:
    routes = RpcRoutes(methods, interceptor).routes()
    saliency = next((m for m in methods if m.path == SALIENCY_PATH), None)
    if saliency is not None:
        routes += KServeRoutes(saliency, interceptor, models, ready, aliases).routes()
    return Starlette(routes=routes, exception_handlers={404: _not_found, 405: _not_found})


def listen(host: str, port: int, backlog: int) -> socket.socket:
    """A listening socket. "::" (gRPC's "[::]") listens on IPv6 and IPv4 alike, as gRPC does: asyncio's own
    bind would set IPV6_V6ONLY, and an IPv4 caller (a Kubernetes probe at the pod's IP) would be refused."""
    family, kind, proto, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and address[0] == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class HttpFront:
    def __init__(self, app: Starlette, settings: HttpSettings) -> None:
        s = settings
        self.settings = s
        host = s.host[1:-1] if s.host.startswith("[") and s.host.endswith("]") else s.host
        self._config = uvicorn.Config(
            app, host=host, port=s.port, lifespan="off", access_log=False, log_config=None, server_header=False,
            timeout_graceful_shutdown=1, ssl_certfile=s.tls_cert, ssl_keyfile=s.tls_key,
            ssl_ca_certs=s.tls_client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED if s.tls_client_ca else ssl.CERT_NONE)
        self._server = uvicorn.Server(self._config)
        self.port = 0
        self._ticker: asyncio.Task[None] | None = None
        self._sockets: list[socket.socket] = []

    async def start(self) -> int:
        self._config.load()
        self._server.lifespan = self._config.lifespan_class(self._config)
        try:
            try:
                self._sockets = [listen(self._config.host, self.settings.port, self._config.backlog)]
            except OSError:
                if self._config.host != "::":
                    raise
                self._sockets = [listen("0.0.0.0", self.settings.port, self._config.backlog)]  # no IPv6 here
        except OSError as exc:
            raise SystemExit(f"cannot bind the HTTP port {self.settings.host}:{self.settings.port}: {exc}") from None
        await self._server.startup(sockets=self._sockets)
        # uvicorn's own tick (10 Hz): keeps the Date header current; ends when the server stops
        self._ticker = asyncio.create_task(self._server.main_loop())
        self.port = int(self._sockets[0].getsockname()[1])
        log.info("HTTP/JSON and KServe v1 on %s:%d%s", self.settings.host, self.port,
                 " with TLS" if self.settings.tls_cert else "")
        return self.port

    async def stop(self) -> None:
        """After the drain (every accepted call answered): close the listener and idle connections."""
        self._server.should_exit = True
        if self._ticker is not None:
            await self._ticker
        if self._server.started:
            await self._server.shutdown(sockets=self._sockets)
