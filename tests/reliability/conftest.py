"""Reliability fixtures (issue #15): one tiny-model server process shared by the fuzz and bad-input tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from convlens.server.launcher import ServerProcess
from convlens.v1 import convlens_pb2_grpc as pb_grpc
from tests.ops.conftest import serve_args, write_tiny_repo


@pytest.fixture(scope="session")
def tiny_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A 32 px TorchScript model (milliseconds per call) with a small probe dataset, so every RPC computes."""
    repo = write_tiny_repo(tmp_path_factory.mktemp("reliability-repo"), size=32)
    photos = write_photos(tmp_path_factory.mktemp("reliability-photos"))
    index = tmp_path_factory.mktemp("reliability-index")
    log = tmp_path_factory.mktemp("reliability-logs") / "server.log"
    with ServerProcess(serve_args(repo, "--dataset", f"tiny={photos}", "--index-dir", str(index),
                                  "--max-jobs", "16", "--index-on-demand", "100"), log_path=log) as srv:
        yield srv


def write_photos(root: Path, count: int = 6) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / f"p{i}.png")
    return root


@pytest.fixture()
def stub(tiny_server: ServerProcess) -> Iterator[pb_grpc.InspectionServiceStub]:
    """A raw stub on a channel with grpcio's DEFAULT limits (8 KB metadata, 4 MB messages), as a plain caller."""
    with grpc.insecure_channel(tiny_server.address) as channel:
        yield pb_grpc.InspectionServiceStub(channel)
