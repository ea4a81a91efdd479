"""Reliability fixtures (issue #15): one tiny-model server process shared by the fuzz and bad-input tests."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from convlens.server.launcher import ServerProcess
from convlens.v1 import convlens_pb2_grpc as pb_grpc
from tools.reliability.tiny import tiny_server as start_tiny_server


@pytest.fixture(scope="session")
def tiny_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Three 32 px models (eager resnet18, TorchScript, ONNX) and a small probe dataset: every RPC computes."""
    with start_tiny_server(tmp_path_factory.mktemp("reliability"), ["--max-jobs", "8"]) as srv:
        yield srv


@pytest.fixture()
def stub(tiny_server: ServerProcess) -> Iterator[pb_grpc.InspectionServiceStub]:
    """A raw stub on a channel with grpcio's DEFAULT limits (8 KB metadata, 4 MB messages), as a plain caller."""
    with grpc.insecure_channel(tiny_server.address) as channel:
        yield pb_grpc.InspectionServiceStub(channel)
