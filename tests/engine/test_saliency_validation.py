"""Bad requests fail with the proto field to fix and a message that says what is valid."""

from __future__ import annotations

import pytest
import torch

from convlens.server.engine.grad_cam import default_cam_layer
from convlens.server.engine.layers import LayerResolver
from convlens.server.engine.saliency import SaliencyOptions, saliency
from convlens.server.engine.targets import ClassTarget, UnitTarget, validate_target
from convlens.server.errors import InvalidArgument, NotFound

SHAPES = {"features.0": (6, 16, 16), "features.2": (8, 8, 8), "head": (5,)}


def field_of(error: InvalidArgument | NotFound) -> str:
    return error.violations[0].field


@pytest.mark.parametrize(("options", "field", "hint"), [
    (SaliencyOptions(method="lime"), "method", "gradient, guided_backprop"),
    (SaliencyOptions(method="integrated_gradients", ig_steps=0), "integrated_gradients.steps", "1..1024"),
    (SaliencyOptions(method="integrated_gradients", ig_steps=1025), "integrated_gradients.steps", "1..1024"),
    (SaliencyOptions(method="integrated_gradients", ig_baseline="noise"), "integrated_gradients.baseline",
     "black"),
    (SaliencyOptions(method="integrated_gradients", ig_baseline="blurred", ig_blur_sigma=0.0),
     "integrated_gradients.blur_sigma", "> 0"),
    (SaliencyOptions(method="smoothgrad", smooth_samples=0), "smoothgrad.samples", "1..256"),
    (SaliencyOptions(method="smoothgrad", smooth_samples=257), "smoothgrad.samples", "1..256"),
    (SaliencyOptions(method="smoothgrad", smooth_noise=-0.1), "smoothgrad.noise_level", "0..1"),
    (SaliencyOptions(method="smoothgrad", smooth_noise=1.5), "smoothgrad.noise_level", "0..1"),
    (SaliencyOptions(method="smoothgrad", smooth_noise=float("nan")), "smoothgrad.noise_level", "0..1"),
    (SaliencyOptions(method="smoothgrad", smooth_base="grad_cam"), "smoothgrad.base_method",
     "integrated_gradients"),
    (SaliencyOptions(method="smoothgrad", smooth_base="integrated_gradients", ig_steps=2000),
     "integrated_gradients.steps", "1..1024"),
    (SaliencyOptions(method="integrated_gradients", ig_baseline="image"), "baseline_image", "baseline_image"),
])
def test_bad_options(relu_net, images, space, options, field, hint):
    with pytest.raises(InvalidArgument) as info:
        saliency(relu_net, images, [None] * 3, options, space)
    assert field_of(info.value) == field
    assert hint in info.value.message


def test_grad_cam_layer_errors(relu_net, images, space):
    with pytest.raises(NotFound) as missing:
        saliency(relu_net, images, [None] * 3, SaliencyOptions(method="grad_cam", cam_layer="layer9"), space)
    assert field_of(missing.value) == "grad_cam.layer"
    assert "GetModel" in missing.value.message
    with pytest.raises(InvalidArgument) as flat:
        saliency(relu_net, images, [None] * 3, SaliencyOptions(method="grad_cam", cam_layer="head"), space)
    assert field_of(flat.value) == "grad_cam.layer"
    assert "(C, H, W) map" in flat.value.message


def test_default_cam_layer_is_the_last_map_before_global_pooling(relu_net, lite_net):
    # `features` finishes last with features.5's output (the same map): the block wins, as layer4 does
    # for a ResNet.
    assert default_cam_layer(relu_net, input_size=(16, 16)) == "features"
    assert default_cam_layer(lite_net, input_size=(16, 16)) == "_bn1"  # head activation is functional
    # A 1x1 input leaves no map to localise in.
    with pytest.raises(InvalidArgument) as info:
        default_cam_layer(relu_net, input_size=(1, 1))
    assert field_of(info.value) == "grad_cam.layer"


def test_default_cam_layer_on_torchvision_resnet():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(weights=None).eval()
    assert default_cam_layer(model, input_size=(64, 64)) == "layer4"
    assert default_cam_layer(model) == "layer4"  # 224 x 224


@pytest.mark.parametrize(("target", "error", "field", "hint"), [
    (ClassTarget(5), InvalidArgument, "target.class_index", "0..4"),
    (ClassTarget(-1), InvalidArgument, "target.class_index", "0..4"),
    (UnitTarget("features.9", 0), NotFound, "target.unit.layer", "GetModel"),
    (UnitTarget("pool", 0), NotFound, "target.unit.layer", "GetModel"),  # a module, not in the catalog
    (UnitTarget("features.2", 8), InvalidArgument, "target.unit.channel", "0..7"),
    (UnitTarget("features.2", 1, y=3), InvalidArgument, "target.unit.x", "both"),
    (UnitTarget("features.2", 1, x=3), InvalidArgument, "target.unit.y", "both"),
    (UnitTarget("features.2", 1, y=8, x=0), InvalidArgument, "target.unit.y", "0..7"),
    (UnitTarget("features.2", 1, y=0, x=-1), InvalidArgument, "target.unit.x", "0..7"),
    (UnitTarget("features.2", 1, reduction="median"), InvalidArgument, "target.unit.reduction", "mean"),
    (UnitTarget("head", 1, y=0, x=0), InvalidArgument, "target.unit.y", "(C, H, W) map"),
])
def test_validate_target_errors(relu_net, target, error, field, hint):
    with pytest.raises(error) as info:
        validate_target(LayerResolver(relu_net, shapes=SHAPES), target, num_classes=5)
    assert field_of(info.value) == field
    assert hint in info.value.message


@pytest.mark.parametrize("target", [
    None, ClassTarget(4), UnitTarget("features.2", 7, y=7, x=0), UnitTarget("features.0", 0, reduction="max"),
    UnitTarget("head", 4),
])
def test_validate_target_accepts(relu_net, target):
    validate_target(LayerResolver(relu_net, shapes=SHAPES), target, num_classes=5)


def test_bad_unit_is_refused_at_compute_time_too(relu_net, images, space):
    """The engine re-checks against the real output, for callers that skipped validate_target."""
    with pytest.raises(InvalidArgument) as info:
        saliency(relu_net, images, [None, UnitTarget("features.2", 99), None], SaliencyOptions(), space)
    assert field_of(info.value) == "target.unit.channel"
    with pytest.raises(NotFound):
        saliency(relu_net, images, [UnitTarget("nope", 0)] * 3, SaliencyOptions(), space)
    with pytest.raises(ValueError):
        saliency(relu_net, images, [None], SaliencyOptions(), space)  # one target per sample
    assert torch.is_grad_enabled()
