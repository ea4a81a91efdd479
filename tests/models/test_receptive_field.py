"""Receptive fields traced from the graph, checked against gradients (what a unit really reads)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from convlens.server.engine.receptive_field import receptive_fields, trace_layers
from convlens.server.models.model import ReceptiveField

Box = tuple[int, int, int, int]


def gradient_support(module: nn.Module, layer: str, size: tuple[int, int],
                     unit: tuple[int, int] | None = None) -> tuple[Box, tuple[int, int]]:
    """Bounding box (x0, y0, x1, y1, half-open) of the input pixels with non-zero gradient of one
    unit of `layer`, and the unit's (y, x). The unit is the centre of the map unless given."""
    captured: dict[str, torch.Tensor] = {}
    handle = module.get_submodule(layer).register_forward_hook(
        lambda _m, _i, out: captured.__setitem__("out", out))
    try:
        torch.manual_seed(0)
        x = torch.randn(1, 3, *size, requires_grad=True)
        module(x)
    finally:
        handle.remove()
    out = captured["out"]
    y, xx = unit if unit is not None else (out.shape[2] // 2, out.shape[3] // 2)
    # Sum over channels: a dead or ReLU-blocked channel must not hide the field.
    out[0, :, y, xx].sum().backward()
    nonzero = (x.grad[0].abs().sum(0) > 0).nonzero()
    assert len(nonzero), "no gradient reached the input"
    y0, x0 = nonzero.min(0).values.tolist()
    y1, x1 = (nonzero.max(0).values + 1).tolist()
    return (x0, y0, x1, y1), (y, xx)


def clipped(box: Box, size: tuple[int, int]) -> Box:
    x0, y0, x1, y1 = box
    return max(x0, 0), max(y0, 0), min(x1, size[1]), min(y1, size[0])


def check_layer(module: nn.Module, layer: str, size: tuple[int, int], *, min_fill: float,
                unit: tuple[int, int] | None = None) -> ReceptiveField:
    rf = receptive_fields(module, size)[layer]
    assert rf is not None
    (gx0, gy0, gx1, gy1), (y, x) = gradient_support(module, layer, size, unit)
    bx0, by0, bx1, by1 = clipped(rf.box(y, x), size)
    # Every pixel the unit depends on lies inside its box ...
    assert bx0 <= gx0 and by0 <= gy0 and gx1 <= bx1 and gy1 <= by1, (layer, rf.box(y, x),
                                                                      (gx0, gy0, gx1, gy1))
    # ... and the box is not much larger than what the gradient reaches.
    assert (gx1 - gx0) >= min_fill * (bx1 - bx0) and (gy1 - gy0) >= min_fill * (by1 - by0), layer
    return rf


def test_two_3x3_convs() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)).eval()
    rf = receptive_fields(model, (16, 16))["1"]
    assert rf == ReceptiveField(5, 5, 1, 1, 2.0, 2.0)
    assert rf.box(0, 0) == (0, 0, 5, 5)


def test_stride_2_then_3x3() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.Conv2d(4, 4, 3)).eval()
    fields = receptive_fields(model, (16, 16))
    assert fields["0"] == ReceptiveField(3, 3, 2, 2, 1.0, 1.0)
    assert fields["1"] == ReceptiveField(7, 7, 2, 2, 3.0, 3.0)
    assert fields["1"].box(1, 2) == (4, 2, 11, 9)


def test_padding_pooling_and_functional_ops() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1, dilation=1)
            self.pool = nn.MaxPool2d(2)
            self.dil = nn.Conv2d(4, 4, 3, dilation=2, padding=2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = F.pad(x, [1, 0, 2, 0])  # a functional, asymmetric pad: shifts position 0
            x = self.pool(self.conv(x))
            x = F.avg_pool2d(x, 3, stride=1, padding=1)
            return torch.cat([self.dil(x), x], dim=1)

    net = Net().eval()
    traces = trace_layers(net, torch.zeros(1, 3, 20, 20))
    # By hand, rows: pad 2 -> [-2, -2]; conv k3 p1 -> [-3, -1]; pool 2/2 -> [-3, 0] jump 2;
    # avg k3 p1 -> [-5, 2]; dilated k3 d2 p2 -> [-9, 6]. Columns: the same from a pad of 1.
    assert traces["conv"].receptive_field == ReceptiveField(3, 3, 1, 1, -2.0, -1.0)
    assert traces["pool"].receptive_field == ReceptiveField(4, 4, 2, 2, -1.5, -0.5)
    assert traces["dil"].receptive_field == ReceptiveField(16, 16, 2, 2, -1.5, -0.5)
    # The root's output is a cat of dil (16) with the pooled map (8): the union is dil's field.
    assert traces[""].receptive_field == traces["dil"].receptive_field
    assert traces[""].output_shape == (8, 11, 10)
    for unit in [(5, 5), (0, 0), (10, 3)]:
        check_layer(net, "dil", (20, 20), min_fill=0.6, unit=unit)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_slices_reflect_padding_and_same_strings() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 4, padding="same")  # even kernel: torch pads 1 before, 2 after
            self.b = nn.Conv2d(4, 4, 3, stride=2)
            self.c = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(self.b(self.a(x))[:, :, 1:, 2::2])

    net = Net().eval()
    fields = receptive_fields(net, (21, 21))
    assert fields["a"] == ReceptiveField(4, 4, 1, 1, 0.5, 0.5)
    # Rows: b -> [-1, 4] jump 2; the slice from 1 -> [1, 6]; c -> [-1, 8]. Columns: from 2 step 2.
    assert fields["c"] == ReceptiveField(10, 14, 2, 4, 3.5, 5.5)
    check_layer(net, "c", (21, 21), min_fill=0.9, unit=(4, 2))
    check_layer(net, "c", (21, 21), min_fill=0.5, unit=(0, 0))  # reflected pixels fall inside


def test_global_ops_cover_the_input() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    fields = receptive_fields(model, (12, 10))
    assert fields["3"] == ReceptiveField(12, 10, 0, 0, 5.5, 4.5)
    assert fields["3"].box(0, 0) == (0, 0, 10, 12)


def test_unhooked_runs_and_uncalled_modules() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Conv2d(3, 3, 3)
            self.unused = nn.Conv2d(3, 3, 3)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y = self.used(x)
            return y, y.sum()

    traces = trace_layers(Net().eval(), torch.zeros(1, 3, 8, 8))
    assert "unused" not in traces
    assert traces[""].output_shape == (3, 6, 6)  # a tuple output: its first tensor


@pytest.mark.slow
@pytest.mark.parametrize(("layer", "size", "min_fill"), [
    ("_conv_stem", (224, 224), 1.0),
    ("_conv_stem", (231, 229), 1.0),  # odd sizes: TF-SAME pads (1, 1) instead of (0, 1)
    ("_blocks.0", (224, 224), 1.0),
    ("_blocks.1", (224, 224), 1.0),
    ("_blocks.2._depthwise_conv", (225, 225), 0.9),
    ("_blocks.5._depthwise_conv", (224, 224), 0.5),
    ("_blocks.10", (224, 224), 0.5),
    ("_conv_head", (224, 224), 0.5),
])
def test_efficientnet_fields_match_gradients(lite0, layer: str, size: tuple[int, int],
                                             min_fill: float) -> None:
    check_layer(lite0.module, layer, size, min_fill=min_fill)


@pytest.mark.slow
def test_efficientnet_field_at_the_corner(lite0) -> None:
    # Position (0, 0) of the stem: SAME padding adds nothing before at 224, so rows/cols 0..2.
    rf = check_layer(lite0.module, "_conv_stem", (224, 224), min_fill=1.0, unit=(0, 0))
    assert rf.box(0, 0) == (0, 0, 3, 3)
    rf = check_layer(lite0.module, "_blocks.1", (224, 224), min_fill=0.5, unit=(3, 2))
    assert (rf.size_y, rf.jump_y) == (11, 4)


@pytest.mark.parametrize(("layer", "min_fill"), [
    ("conv1", 1.0), ("maxpool", 1.0), ("layer1.0.conv1", 1.0), ("layer1", 0.9),
    ("layer2.0.downsample", 0.9), ("layer2", 0.8), ("layer3.1.conv1", 0.5),
])
def test_resnet18_fields_match_gradients(layer: str, min_fill: float) -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    check_layer(model, layer, (160, 160), min_fill=min_fill)


def test_known_resnet18_field() -> None:
    fields = receptive_fields(torchvision.models.resnet18(weights=None).eval(), (224, 224))
    assert (fields["layer4"].size_y, fields["layer4"].jump_y) == (435, 32)
    assert (fields["maxpool"].size_y, fields["maxpool"].jump_y) == (11, 4)
