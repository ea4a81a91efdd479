"""EfficientNet-Lite in plain torch, with the module names of the lukemelas-style state dicts.

Lite differs from EfficientNet-B*: ReLU6 instead of swish, no squeeze-excite, and the stem (32), the head
(1280) and the repeats of the first and last block groups are not scaled. Padding is TensorFlow "SAME",
computed from the input size in forward, so weights trained in TF give TF's numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# (expand ratio, kernel, stride, output channels, repeats) of EfficientNet-B0 = Lite0.
BLOCK_TABLE: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # TF's 0.99; only matters in training


@dataclass(frozen=True)
class LiteVariant:
    width: float
    depth: float
    resolution: int
    dropout: float


VARIANTS: dict[str, LiteVariant] = {
    "efficientnet_lite0": LiteVariant(1.0, 1.0, 224, 0.2),
    "efficientnet_lite1": LiteVariant(1.0, 1.1, 240, 0.2),
    "efficientnet_lite2": LiteVariant(1.1, 1.2, 260, 0.3),
}


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """EfficientNet's channel rounding: nearest multiple of `divisor`, never more than 10% down."""
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TF "SAME" padding (before, after) of one axis: output ceil(size/stride), extra pixel after."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class SamePadConv2d(nn.Conv2d):
    """Conv2d with TF "SAME" padding from the actual input size (asymmetric on stride 2).

    The padding is an F.pad inside forward (not a child module) so named_modules() stays the
    state dict's layout; `padding` itself stays 0. Symmetric padding is left to the convolution itself,
    which pads without copying the input (the same zeros: results are bit-identical; Lite0 forward +
    backward ~5-7% less CPU, docs/performance.md).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        top, bottom = same_padding(ih, self.kernel_size[0], self.stride[0], self.dilation[0])
        left, right = same_padding(iw, self.kernel_size[1], self.stride[1], self.dilation[1])
        if top == bottom and left == right:  # symmetric (every stride-1 layer): the conv pads, no copy
            return F.conv2d(x, self.weight, self.bias, self.stride, (top, left), self.dilation, self.groups)
        x = F.pad(x, [left, right, top, bottom])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted bottleneck: [1x1 expand, BN, ReLU6], depthwise kxk, BN, ReLU6, 1x1 project, BN, (+x)."""

    def __init__(self, in_ch: int, out_ch: int, expand: int, kernel: int, stride: int) -> None:
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        # Registration order = forward order, so the layer catalog lists layers as they run.
        if self.has_expand:
            self._expand_conv = SamePadConv2d(in_ch, mid, 1, bias=False)
            self._bn0 = _bn(mid)
            self._act0 = nn.ReLU6()
        self._depthwise_conv = SamePadConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._act1 = nn.ReLU6()
        self._project_conv = SamePadConv2d(mid, out_ch, 1, bias=False)
        self._bn2 = _bn(out_ch)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs
        if self.has_expand:
            x = self._act0(self._bn0(self._expand_conv(x)))
        x = self._act1(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        if self.residual:
            x = x + inputs
        return x


class EfficientNetLite(nn.Module):
    def __init__(self, variant: LiteVariant, num_classes: int = 1000) -> None:
        super().__init__()
        self._conv_stem = SamePadConv2d(3, STEM_CHANNELS, 3, stride=2, bias=False)
        self._bn0 = _bn(STEM_CHANNELS)
        self._act0 = nn.ReLU6()
        blocks: list[MBConvBlock] = []
        in_ch = STEM_CHANNELS
        last = len(BLOCK_TABLE) - 1
        for i, (expand, kernel, stride, out, repeats) in enumerate(BLOCK_TABLE):
            out_ch = round_filters(out, variant.width)
            # Lite keeps the first and last groups' depth (like its stem and head).
            n = repeats if i in (0, last) else int(math.ceil(variant.depth * repeats))
            for j in range(n):
                blocks.append(MBConvBlock(in_ch, out_ch, expand, kernel, stride if j == 0 else 1))
                in_ch = out_ch
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SamePadConv2d(in_ch, HEAD_CHANNELS, 1, bias=False)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._act1 = nn.ReLU6()
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(variant.dropout)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._act0(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self._act1(self._bn1(self._conv_head(x)))
        x = torch.flatten(self._avg_pooling(x), 1)
        return self._fc(self._dropout(x))


def efficientnet_lite(name: str, num_classes: int = 1000) -> EfficientNetLite:
    """An untrained EfficientNet-Lite (`efficientnet_lite0` .. `efficientnet_lite2`)."""
    return EfficientNetLite(VARIANTS[name], num_classes)
