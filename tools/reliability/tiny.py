"""A small-model ConvLens server for reliability runs: three 32 px models in the three folder formats (an
eager torchvision resnet18, a TorchScript CNN and the same CNN in ONNX; milliseconds per call), a probe
dataset of six random photos, an index folder of its own. Every RPC computes on it."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from convlens.server.launcher import ServerProcess

MODEL = "tinyscript"
EAGER = "resnet"
ONNX = "tinyonnx"


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def write_repo(root: Path, size: int = 32, *, formats: Sequence[str] = ("torchscript",)) -> Path:
    """The tiny CNN as TorchScript; with "torchvision" and "onnx" in `formats`, a resnet18 state dict (eager:
    hooks on every layer) and the CNN in ONNX (forward only) as well."""
    import warnings

    torch.manual_seed(0)
    tiny = TinyNet().eval()
    pre = f"[preprocess]\nsize = {size}\nresize = {size}\n"
    (root / MODEL).mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; the server still loads it
        torch.jit.script(tiny).save(str(root / MODEL / "model.pt"))
    (root / MODEL / "model.toml").write_text(f'format = "torchscript"\nfile = "model.pt"\n{pre}')
    if "torchvision" in formats:
        import torchvision

        (root / EAGER).mkdir()
        torch.save(torchvision.models.resnet18(weights=None, num_classes=5).eval().state_dict(),
                   root / EAGER / "weights.pt")
        (root / EAGER / "model.toml").write_text(
            f'format = "torchvision"\narch = "resnet18"\nweights = "weights.pt"\nnum_classes = 5\n{pre}')
    if "onnx" in formats:
        (root / ONNX).mkdir()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(tiny, (torch.randn(1, 3, size, size),), str(root / ONNX / "model.onnx"),
                              input_names=["input"], output_names=["logits"], dynamo=False)
        (root / ONNX / "model.toml").write_text(f'format = "onnx"\nfile = "model.onnx"\n{pre}')
    return root


def write_photos(root: Path, count: int = 6) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / f"p{i}.png")
    return root


def server_args(root: Path, *extra: str) -> list[str]:
    """Arguments of `convlens serve` for the tiny repository, dataset and index under `root`."""
    repo = root / "repo"
    if not repo.exists():
        write_repo(repo, formats=("torchscript", "torchvision", "onnx"))
    photos = write_photos(root / "photos") if not (root / "photos").exists() else root / "photos"
    (root / "index").mkdir(exist_ok=True)
    return ["--device", "cpu", "--no-embedded", "--model-repo", str(repo), "--dataset", f"tiny={photos}",
            "--index-dir", str(root / "index"), "--index-on-demand", "100", *extra]


@contextmanager
def tiny_server(root: Path, extra: Sequence[str] = (), env: dict[str, str] | None = None
                ) -> Iterator[ServerProcess]:
    with ServerProcess(server_args(root, *extra), log_path=root / "server.log", env=env) as srv:
        yield srv
