"""Tiny networks for the engine tests: small enough to run on 2 CPU cores in milliseconds.

Every model takes a normalised [B, 3, H, W] batch and returns logits [B, K], like a served model.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convlens.server.engine.pixel_space import PixelSpace

NUM_CLASSES = 5


class ReluNet(nn.Module):
    """Conv / ReLU modules only (non-inplace), so Captum's ReLU-module hooks are exact on it."""

    def __init__(self, act: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), act(),
            nn.Conv2d(6, 8, 3, padding=1, stride=2), act(),
            nn.Conv2d(8, 8, 3, padding=1), act(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(8, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))


class FunctionalReluNet(nn.Module):
    """ReluNet's layers, activations as `F.relu(x, inplace=True)` in forward (GoogLeNet's BasicConv2d)."""

    RELU_CALLS = 3

    def __init__(self, source: ReluNet) -> None:
        super().__init__()
        self.conv1, self.conv2, self.conv3 = (copy.deepcopy(source.features[i]) for i in (0, 2, 4))
        self.head = copy.deepcopy(source.head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x), inplace=True)
        x = F.relu(self.conv2(x), inplace=True)
        x = F.relu(self.conv3(x), inplace=True)
        return self.head(x.mean(dim=(2, 3)))


class MBBlock(nn.Module):
    """EfficientNet-Lite's inverted residual: expand 1x1, depthwise, project 1x1; ReLU6; no SE."""

    def __init__(self, channels: int, expand: int = 4) -> None:
        super().__init__()
        hidden = channels * expand
        self._expand_conv = nn.Conv2d(channels, hidden, 1, bias=False)
        self._bn0 = nn.BatchNorm2d(hidden, eps=1e-3)
        self._depthwise_conv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False)
        self._bn1 = nn.BatchNorm2d(hidden, eps=1e-3)
        self._project_conv = nn.Conv2d(hidden, channels, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(channels, eps=1e-3)
        self._relu = nn.ReLU6(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._relu(self._bn0(self._expand_conv(x)))
        y = self._relu(self._bn1(self._depthwise_conv(y)))
        return x + self._bn2(self._project_conv(y))


class LiteNet(nn.Module):
    """EfficientNet-Lite-like: ReLU6 modules (one shared per block, inplace) and a functional relu6."""

    RELU6_CALLS = 1 + 2 * 2 + 1  # stem, two per block, head

    def __init__(self) -> None:
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self._bn0 = nn.BatchNorm2d(8, eps=1e-3)
        self._stem_act = nn.ReLU6(inplace=True)
        self._blocks = nn.Sequential(MBBlock(8), MBBlock(8))
        self._conv_head = nn.Conv2d(8, 16, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(16, eps=1e-3)
        self._fc = nn.Linear(16, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._stem_act(self._bn0(self._conv_stem(x)))
        x = self._blocks(x)
        x = F.relu6(self._bn1(self._conv_head(x)), inplace=True)
        return self._fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def randomise_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics, scaled so that many ReLU6 inputs pass 6 (the upper mask matters)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.05)
            m.weight.data.copy_(torch.rand(n, generator=g) * 3 + 1)
            m.bias.data.copy_(torch.randn(n, generator=g) * 2)
    return model


def seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    """Deterministic weights; He-initialised convs, so gradients are O(1e-2..1), not vanishing."""
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.reset_parameters()
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return model.eval()


@pytest.fixture
def relu_net() -> ReluNet:
    return seeded(ReluNet())  # type: ignore[return-value]


@pytest.fixture
def lite_net() -> LiteNet:
    return randomise_batchnorm(seeded(LiteNet()))  # type: ignore[return-value]


@pytest.fixture
def functional_relu_net(relu_net: ReluNet) -> FunctionalReluNet:
    return FunctionalReluNet(relu_net).eval()


@pytest.fixture
def space() -> PixelSpace:
    return PixelSpace(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


@pytest.fixture
def images() -> torch.Tensor:
    """Three normalised 16x16 images."""
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
