"""Fixtures: one in-process fake ConvLens server (and metrics endpoint) per session, recordings per test."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import pytest

from convlens.v1 import convlens_pb2_grpc as pb_grpc

from .fake_server import FakeServer, FakeServicer, metrics_text


@pytest.fixture(scope="session")
def fake_server() -> Iterator[FakeServer]:
    servicer = FakeServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
    pb_grpc.add_InspectionServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            body = metrics_text(servicer).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    try:
        yield FakeServer(f"127.0.0.1:{port}", servicer, f"http://127.0.0.1:{http.server_address[1]}/metrics")
    finally:
        http.shutdown()
        http.server_close()
        server.stop(None)


@pytest.fixture
def server(fake_server: FakeServer) -> FakeServer:
    """The shared fake server with its recordings cleared for this test."""
    with fake_server.rec.lock:
        fake_server.rec.requests.clear()
        fake_server.rec.metadata.clear()
        fake_server.rec.images.clear()
    return fake_server
