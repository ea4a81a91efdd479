"""Start `convlens serve` as a child process on free ports and wait until it is healthy.

Used by `make demo`, `make bench` and the end-to-end tests: they talk to a real server, as users do.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """`with ServerProcess(["--model-repo", d]) as srv: Client(srv.address)`."""

    def __init__(self, args: Sequence[str] = (), *, startup_timeout: float = 180.0,
                 log_path: Path | None = None, env: dict[str, str] | None = None,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        self.args = ["--host", "127.0.0.1", "--port", str(self.port), "--metrics-port", str(self.metrics_port),
                     *args]
        self.startup_timeout = startup_timeout
        self.log_path = log_path
        self.env = env
        self.credentials = credentials  # for a TLS server: how the health check connects
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        out = subprocess.DEVNULL
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
            out = self._log
        env = {**os.environ, **(self.env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "convlens.server.app", *self.args],
                                     stdout=out, stderr=subprocess.STDOUT, env=env)
        self.wait_healthy()

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        with (grpc.secure_channel(self.address, self.credentials) if self.credentials is not None
              else grpc.insecure_channel(self.address)) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with code {self.proc.returncode} before it was healthy"
                                       + (f"; see {self.log_path}" if self.log_path else ""))
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"server not healthy after {self.startup_timeout:.0f} s")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode
