"""deploy/kserve/ and `convlens kserve-explainer`: the manifest is a valid InferenceService whose explainer
container, given the arguments KServe appends, starts ConvLens; a process started with exactly those
arguments answers KServe's readiness and explain requests with gRPC Saliency's numbers."""

from __future__ import annotations

import base64
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import kubernetes_validate
import numpy as np
import pytest
import yaml

from convlens.server.config import from_args
from convlens.server.kserve_explainer import config_from
from convlens.server.launcher import free_port
from convlens.v1 import convlens_pb2 as pb
from convlens.v1 import convlens_pb2_grpc as pb_grpc
from convlens.wire.tensors import to_numpy
from tests.operations.conftest import TINY, write_tiny_repo

from .conftest import photo, png

MANIFEST = Path(__file__).resolve().parents[2] / "deploy" / "kserve" / "inferenceservice.yaml"


def kserve_args(name: str, namespace: str, http_port: int) -> list[str]:
    """What KServe's controller appends to a custom explainer's args (explainer_custom.go: GetContainer)."""
    return ["--model_name", name, "--predictor_host", f"{name}-predictor.{namespace}", "--http_port", str(http_port)]


def manifest() -> dict[str, Any]:
    obj = yaml.safe_load(MANIFEST.read_text())
    assert isinstance(obj, dict)
    return obj


def test_the_manifest_is_an_inference_service_with_convlens_as_explainer() -> None:
    isvc = manifest()
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    assert isvc["spec"]["predictor"]["model"]["storageUri"]
    (container,) = isvc["spec"]["explainer"]["containers"]
    assert container["command"] == ["convlens", "kserve-explainer"]
    assert container["readinessProbe"]["httpGet"] == {"path": f"/v1/models/{isvc['metadata']['name']}",
                                                      "port": 8080}
    # the container itself against the Kubernetes schema (the InferenceService is a CRD: no schema here)
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "explainer"}, "spec": {"containers": [container]}}
    kubernetes_validate.validate(pod, "1.30.0", strict=True)
    # its args with KServe's appended ones make a valid server configuration
    args, serve = config_from([*container["args"], *kserve_args(isvc["metadata"]["name"], "default", 8080)])
    config = from_args(serve)
    assert (args.model_name, args.convlens_model) == ("cat-classifier", "efficientnet_lite0")
    assert config.http_port == 8080 and config.port == 8081 and config.grace_seconds == 30


def test_kserve_args_win_in_kserve_order() -> None:
    """KServe appends --http_port even when the container already has one: the last one counts."""
    args, serve = config_from(["--http_port", "9000", "--workers", "4", *kserve_args("m", "ns", 8080)])
    assert args.http_port == 8080 and args.workers == 4 and args.predictor_host == "m-predictor.ns"
    assert from_args(serve).http_port == 8080


@pytest.fixture(scope="module")
def explainer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int]]:
    """`python -m convlens.server.kserve_explainer` with test serve flags, then exactly KServe's arguments
    (a free port in place of KServe's 8080, which this shared machine cannot promise)."""
    repo = write_tiny_repo(tmp_path_factory.mktemp("kserve-repo"))
    http_port, grpc_port = free_port(), free_port()
    log = tmp_path_factory.mktemp("kserve-log") / "explainer.log"
    argv = ["--device", "cpu", "--no-embedded", "--model-repo", str(repo), "--host", "127.0.0.1",
            "--metrics-port", "0", "--grpc_port", str(grpc_port),
            *kserve_args("cat-classifier", "default", http_port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "convlens.server.kserve_explainer", *argv],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:  # KServe's readiness check: GET /v1/models/NAME answers ready
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{http_port}/v1/models/cat-classifier", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        yield http_port, grpc_port
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()


@pytest.mark.slow  # a real server process
def test_the_explainer_answers_kserve_requests_like_grpc_saliency(explainer: tuple[int, int]) -> None:
    http_port, grpc_port = explainer
    image = png(photo(64, 64, seed=7))
    ready = httpx.get(f"http://127.0.0.1:{http_port}/v1/models/cat-classifier", timeout=10).json()
    assert ready == {"name": "cat-classifier", "ready": True}
    # KServe's v1 request shape: instances with b64 images; no parameters: Saliency's defaults
    answer = httpx.post(f"http://127.0.0.1:{http_port}/v1/models/cat-classifier:explain", timeout=60,
                        json={"instances": [{"b64": base64.b64encode(image).decode()}]})
    assert answer.status_code == 200, answer.text
    (explained,) = answer.json()["explanations"]
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        by_grpc = pb_grpc.InspectionServiceStub(channel).Saliency(
            pb.SaliencyRequest(model=TINY, image=pb.Image(encoded=image)), timeout=60)
    attribution = to_numpy(by_grpc.attribution)
    assert np.abs(attribution).sum() > 0
    np.testing.assert_array_equal(np.asarray(explained["attribution"]["values"], np.float32), attribution)
    assert explained["target"] == {"classIndex": by_grpc.target.class_index}
