"""Health, reflection, metrics and graceful shutdown of a real server process."""

from __future__ import annotations

import signal
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from convlens.client import Client, NotFoundError, UnavailableError
from convlens.server.launcher import ServerProcess

pytestmark = pytest.mark.slow


def test_health_reports_serving_for_the_server_and_the_service(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "convlens.v1.InspectionService"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_services(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                 timeout=10))
        names = {s.name for s in replies[0].list_services_response.service}
        assert {"convlens.v1.InspectionService", "grpc.health.v1.Health"} <= names


def test_metrics_count_rpcs_by_code_and_show_loaded_models(server: ServerProcess, client: Client) -> None:
    client.list_models()
    with pytest.raises(NotFoundError):
        client.get_model("nope")
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    assert 'grpc_server_handled_total{grpc_code="OK",grpc_method="ListModels"' in text
    assert 'grpc_code="NOT_FOUND",grpc_method="GetModel"' in text
    assert "grpc_server_started_total" in text and "grpc_server_handling_seconds_bucket" in text
    assert 'convlens_model_loaded{format="embedded",model="efficientnet_lite0"} 1.0' in text
    assert 'convlens_model_load_failures_total{model="broken"} 1.0' in text


def _sample(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_until_computing(srv: ServerProcess, method: str, timeout: float = 120.0) -> None:
    """Until the server's metrics say the call started, was not answered, and its task's batch began
    (queue wait observed = compute started): the server's own account, not a sleep and a hope."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = urllib.request.urlopen(srv.metrics_url, timeout=10).read().decode()
        started = _sample(text, "grpc_server_started_total", grpc_method=method)
        handled = _sample(text, "grpc_server_handled_total", grpc_method=method)
        computing = _sample(text, "convlens_scheduler_queue_wait_seconds_count")
        if started == 1 and handled == 0 and computing >= 1:
            return
        time.sleep(0.02)
    raise TimeoutError(f"{method} never reached a worker")


def test_sigterm_lets_the_in_flight_call_finish_then_exits(tmp_path) -> None:
    srv = ServerProcess(["--device", "cpu", "--grace", "60"], log_path=tmp_path / "log")
    srv.start()
    try:
        result: dict[str, object] = {}

        def call() -> None:
            with Client(srv.address, timeout=120) as c:
                image = np.random.default_rng(1).integers(0, 256, (224, 224, 3), dtype=np.uint8)
                try:
                    result["ok"] = c.saliency(image, "efficientnet_lite0", method="integrated_gradients", steps=64)
                except Exception as e:  # noqa: BLE001
                    result["error"] = e

        t = threading.Thread(target=call)
        t.start()
        wait_until_computing(srv, "Saliency")
        assert srv.proc is not None
        srv.proc.send_signal(signal.SIGTERM)
        t.join(120)
        assert "error" not in result, result.get("error")
        assert result["ok"].attribution.shape == (3, 224, 224)
        assert srv.proc.wait(60) == 0
        # and it no longer accepts calls
        with Client(srv.address, timeout=5) as c, pytest.raises(UnavailableError):
            c.list_models()
    finally:
        srv.stop()
