"""End-to-end fixtures: a real `convlens serve` process on free ports, with a temporary model repository."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torchvision

from convlens.client import Client
from convlens.server.launcher import ServerProcess
from tools.reliability.tiny import TinyNet  # one tiny CNN for the suite and the fuzz tools


def build_model_repo(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Write resnet18 (state dict), tinyscript (TorchScript), tinyonnx (ONNX) and one broken folder.

    Returns each model's state dict so tests can compare what the server reports with the files.
    """
    torch.manual_seed(0)
    states: dict[str, dict[str, torch.Tensor]] = {}

    resnet = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    (root / "resnet18").mkdir(parents=True)
    torch.save(resnet.state_dict(), root / "resnet18" / "weights.pt")
    (root / "resnet18" / "labels.txt").write_text("\n".join(f"thing {i}" for i in range(10)) + "\n")
    (root / "resnet18" / "model.toml").write_text(
        'format = "torchvision"\narch = "resnet18"\nweights = "weights.pt"\nlabels = "labels.txt"\n'
        "[preprocess]\nsize = 64\nresize = 72\n")
    states["resnet18"] = resnet.state_dict()

    tiny = TinyNet().eval()
    (root / "tinyscript").mkdir()
    torch.jit.script(tiny).save(str(root / "tinyscript" / "model.pt"))
    (root / "tinyscript" / "model.toml").write_text(
        'format = "torchscript"\nfile = "model.pt"\n[preprocess]\nsize = 32\nresize = 32\n')
    states["tinyscript"] = tiny.state_dict()

    (root / "tinyonnx").mkdir()
    torch.onnx.export(tiny, (torch.randn(1, 3, 32, 32),), str(root / "tinyonnx" / "model.onnx"),
                      input_names=["input"], output_names=["logits"], dynamo=False)
    (root / "tinyonnx" / "model.toml").write_text(
        'format = "onnx"\nfile = "model.onnx"\n[preprocess]\nsize = 32\nresize = 32\n')
    states["tinyonnx"] = tiny.state_dict()

    (root / "broken").mkdir()
    (root / "broken" / "model.toml").write_text('format = "torchvision"\narch = "resnet18"\nweights = "missing.pt"\n')
    return states


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[str, torch.Tensor]]]:
    root = tmp_path_factory.mktemp("model-repo")
    return root, build_model_repo(root)


@pytest.fixture(scope="session")
def server(model_repo: tuple[Path, dict[str, dict[str, torch.Tensor]]], tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("logs") / "server.log"
    with ServerProcess(["--device", "cpu", "--model-repo", str(model_repo[0])], log_path=log) as srv:
        yield srv


@pytest.fixture()
def client(server: ServerProcess) -> Iterator[Client]:
    with Client(server.address, timeout=120) as c:
        yield c
