"""The peer bench's three servers give equal answers on a tiny model (the check `make bench-peers` runs
before any timing counts), and that check fails on a wrong answer."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from convlens.server.launcher import ServerProcess, free_port
from convlens.v1 import convlens_pb2 as pb
from convlens.wire.tensors import to_numpy, to_tensor
from tools.peers.bench import Peer, check_answers, compare, saliency_bodies
from tools.peers.driver import Caller, GrpcCaller, HttpCaller

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("peer-repo")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    (root / "tiny").mkdir()
    torch.save(model.state_dict(), root / "tiny" / "weights.pt")
    (root / "tiny" / "labels.txt").write_text("\n".join(f"thing {i}" for i in range(10)) + "\n")
    (root / "tiny" / "model.toml").write_text(
        'format = "torchvision"\narch = "resnet18"\nweights = "weights.pt"\nlabels = "labels.txt"\n'
        "[preprocess]\nsize = 48\nresize = 56\n")
    return root


def images() -> list[bytes]:
    rng = np.random.default_rng(7)
    out = []
    for shape in ((60, 80, 3), (48, 48, 3), (90, 70, 3)):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


@pytest.fixture(scope="module")
def servers(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    logs = tmp_path_factory.mktemp("peer-logs")
    plain_port = free_port()
    with ServerProcess(["--device", "cpu", "--no-embedded", "--model-repo", str(repo)],
                       log_path=logs / "convlens.log") as convlens:
        plain = Peer("plain", ["tools.peers.plain_server", "--port", str(plain_port), "--model", str(repo / "tiny")],
                     logs / "plain.log", startup=300)
        try:
            yield {"convlens": convlens.address, "plain": f"127.0.0.1:{plain_port}"}
        finally:
            plain.stop()


async def _check(callers: dict[str, Caller]) -> list[str]:
    try:
        return await check_answers(callers, saliency_bodies("tiny", images()))
    finally:
        for c in callers.values():
            await c.close()


async def test_plain_server_answers_equal_convlens(servers: dict[str, str]) -> None:
    checked = await _check({"convlens": GrpcCaller(servers["convlens"]), "plain": GrpcCaller(servers["plain"])})
    assert len(checked) == 3 and all("plain == convlens" in line for line in checked)
    # ConvLens sent only what was asked: heatmap and predictions, no attribution.
    caller = GrpcCaller(servers["convlens"])
    try:
        answer = pb.SaliencyResponse.FromString(await caller.saliency(saliency_bodies("tiny", images())[0]))
    finally:
        await caller.close()
    assert not answer.HasField("attribution") and answer.HasField("heatmap") and len(answer.predictions) == 5
    assert to_numpy(answer.heatmap).shape == (48, 48) and to_numpy(answer.heatmap).max() > 0


def test_the_check_catches_a_wrong_heatmap_and_a_wrong_class() -> None:
    heat = np.random.default_rng(0).random((8, 8), dtype=np.float32)
    good = pb.SaliencyResponse(heatmap=to_tensor(heat), target=pb.Target(class_index=3), target_value=2.0,
                               predictions=[pb.Prediction(class_index=3), pb.Prediction(class_index=1)])
    assert compare(good, good, "same") is None
    off = pb.SaliencyResponse()
    off.CopyFrom(good)
    off.heatmap.CopyFrom(to_tensor(heat * 1.01))
    assert "heatmaps differ" in (compare(off, good, "x") or "")
    swapped = pb.SaliencyResponse()
    swapped.CopyFrom(good)
    del swapped.predictions[:]
    swapped.predictions.extend([pb.Prediction(class_index=1), pb.Prediction(class_index=3)])
    assert "top-5" in (compare(swapped, good, "x") or "")


async def test_ray_serve_answers_equal_convlens(servers: dict[str, str], repo: Path,
                                               tmp_path_factory: pytest.TempPathFactory) -> None:
    pytest.importorskip("ray.serve")
    logs = tmp_path_factory.mktemp("ray-logs")
    port, control = free_port(), free_port()
    ray = Peer("ray", ["tools.peers.ray_server", "--port", str(port), "--control-port", str(control), "--model",
                       str(repo / "tiny"), "--batch", "4", "--wait", "0.01"], logs / "ray.log", startup=600)
    try:
        checked = await _check({"convlens": GrpcCaller(servers["convlens"]),
                                "ray": HttpCaller(f"http://127.0.0.1:{port}")})
    finally:
        ray.stop()
    assert len(checked) == 3 and all("ray == convlens" in line for line in checked)
