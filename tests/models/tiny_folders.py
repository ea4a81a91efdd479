"""Tiny TorchScript model folders for model-control tests: each `variant` has its own weights, labels and
normalisation, so an answer shows which copy computed it (labels: the copy the service looked up; the logit:
that copy's preprocessing and weights)."""

from __future__ import annotations

import shutil
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

SIZE = 16


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.conv(x)).mean(dim=(2, 3)))


def _mean(variant: int) -> list[float]:
    return [0.3 + 0.1 * variant] * 3


def tiny_net(variant: int) -> TinyNet:
    torch.manual_seed(variant)
    return TinyNet().eval()


def write_folder(folder: Path, variant: int) -> Path:
    """A flat TorchScript model folder (model.toml, model.pt, labels.txt) of `variant`."""
    folder.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; TorchScript files still load
        torch.jit.script(tiny_net(variant)).save(str(folder / "model.pt"))
    (folder / "labels.txt").write_text("".join(f"v{variant}-class{i}\n" for i in range(3)))
    (folder / "model.toml").write_text(
        f'format = "torchscript"\nfile = "model.pt"\nlabels = "labels.txt"\n'
        f"[preprocess]\nsize = {SIZE}\nresize = {SIZE}\nmean = {_mean(variant)}\nstd = [0.25, 0.25, 0.25]\n")
    return folder


def copy_in(source: Path, dest: Path) -> None:
    """Place `source` at `dest` at once: copied under a hidden name (skipped by the repository), then renamed."""
    hidden = dest.parent / f".incoming-{uuid.uuid4().hex}"
    shutil.copytree(source, hidden)
    hidden.rename(dest)


def image(seed: int = 0) -> np.ndarray:
    """An image already at the input size: used as it is, no resize."""
    return np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


def logit(variant: int, pixels: np.ndarray, class_index: int = 0) -> float:
    """What `variant` answers for `pixels`: its own normalisation, then its own weights."""
    x = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
    mean = torch.tensor(_mean(variant)).view(3, 1, 1)
    with torch.no_grad():
        return float(tiny_net(variant)(((x - mean) / 0.25)[None])[0, class_index])


def variant_of(labels: list[str]) -> int:
    """The variant whose labels an answer carries (all of them must agree)."""
    found = {label.split("-")[0] for label in labels}
    assert len(found) == 1, f"labels of two copies in one answer: {labels}"
    return int(found.pop()[1:])
