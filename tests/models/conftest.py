"""Shared fixtures: the real EfficientNet-Lite0 (loaded once) and tiny CNNs for the model formats."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from convlens.server.models.embedded import load_lite
from convlens.server.models.model import ServedModel
from convlens.server.models.preprocess import prepare


@pytest.fixture(scope="session")
def lite0() -> ServedModel:
    return load_lite("efficientnet_lite0")


def top_k(model: ServedModel, image: np.ndarray, k: int = 3) -> list[tuple[str, float]]:
    x, _ = prepare(image, model.preprocess)
    with torch.no_grad():
        probs = model.module(x[None]).softmax(1)[0]
    values, indices = probs.topk(k)
    return [(model.labels[int(i)], float(v)) for v, i in zip(values, indices, strict=True)]


class TinyCNN(nn.Module):
    """Conv with bias, a conv+BN+ReLU block (BN gets fused by the ONNX exporter), a grouped conv."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False),
                                   nn.BatchNorm2d(8), nn.ReLU())
        self.conv3 = nn.Conv2d(8, 6, 3, padding=1, groups=2)
        self.fc = nn.Linear(6, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv3(self.block(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def make_tiny_cnn() -> TinyCNN:
    """The same tiny CNN on every call (seeded), so module-scoped fixtures can rebuild it."""
    torch.manual_seed(0)
    model = TinyCNN().eval()
    with torch.no_grad():  # non-trivial BN statistics, so a wrong fusion would show
        model.block[1].running_mean.uniform_(-1, 1)
        model.block[1].running_var.uniform_(0.5, 2)
    return model


@pytest.fixture
def tiny_cnn() -> TinyCNN:
    return make_tiny_cnn()
