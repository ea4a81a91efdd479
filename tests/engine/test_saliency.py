"""Saliency methods against independent references: Captum where Captum is right, closed forms on toys."""

from __future__ import annotations

import pytest
import torch
from captum.attr import (
    Deconvolution,
    GuidedBackprop,
    GuidedGradCam,
    IntegratedGradients,
    LayerAttribution,
    LayerGradCam,
    NeuronGradient,
    Saliency,
)
from torch import nn

from convlens.server.engine.integrated_gradients import black_baseline, gaussian_blur
from convlens.server.engine.pixel_space import PixelSpace
from convlens.server.engine.saliency import SaliencyOptions, saliency
from convlens.server.engine.targets import ClassTarget, UnitTarget

from .helpers import CLASSES, close, differs, leaf

pytestmark = pytest.mark.filterwarnings("ignore:Setting backward hooks:UserWarning")  # Captum's notice




def run(model: nn.Module, x: torch.Tensor, space: PixelSpace, targets: list, **options: object) -> list:
    return saliency(model, x, targets, SaliencyOptions(**options), space)  # type: ignore[arg-type]



def stacked(results: list) -> torch.Tensor:
    return torch.stack([r.attribution for r in results])


def test_gradient_is_signed_and_matches_captum(relu_net, images, space):
    results = run(relu_net, images, space, [ClassTarget(c) for c in CLASSES])
    reference = Saliency(relu_net).attribute(leaf(images), target=CLASSES, abs=False)
    close(stacked(results), reference)
    assert (stacked(results) < 0).any()  # not the absolute value
    close(results[0].heatmap, reference[0].abs().amax(dim=0))
    logits = relu_net(images).detach()
    for i, c in enumerate(CLASSES):
        assert results[i].target_value == pytest.approx(float(logits[i, c]), abs=1e-5)
        torch.testing.assert_close(results[i].logits, logits[i])


def test_unit_gradient_matches_captum_neuron_gradient(relu_net, images, space):
    target = UnitTarget("features.2", channel=5, y=3, x=4)
    results = run(relu_net, images, space, [target] * 3)
    reference = NeuronGradient(relu_net, relu_net.features[2]).attribute(leaf(images),
                                                                          neuron_selector=(5, 3, 4))
    close(stacked(results), reference)
    activation = relu_net.features[:3](images)[:, 5, 3, 4]
    assert [r.target_value for r in results] == pytest.approx(activation.tolist(), abs=1e-5)


def test_default_target_is_top1_logit(relu_net, images, space):
    results = run(relu_net, images, space, [None, None, None])
    top1 = relu_net(images).argmax(dim=1).tolist()
    assert [r.target for r in results] == [ClassTarget(c) for c in top1]
    reference = Saliency(relu_net).attribute(leaf(images), target=top1, abs=False)
    close(stacked(results), reference)


class OnesConv(nn.Module):
    """One 3x3 conv, all-ones weights, no padding, summed: d out / d x[c, i, j] = n(i) * n(j)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 3, bias=False)
        nn.init.ones_(self.conv.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).sum(dim=(2, 3))


def test_hand_computed_gradients_on_ones_conv(space):
    model = OnesConv().eval()
    x = torch.randn(1, 3, 5, 5)
    n = torch.tensor([1.0, 2.0, 3.0, 2.0, 1.0])  # how many 3x3 windows cover each row / column
    expected = torch.outer(n, n).expand(3, 5, 5)
    (result,) = run(model, x, space, [ClassTarget(0)])
    torch.testing.assert_close(result.attribution, expected)
    (unit,) = run(model, x, space, [UnitTarget("conv", 0, y=1, x=2)])
    window = torch.zeros(5, 5)
    window[1:4, 2:5] = 1
    torch.testing.assert_close(unit.attribution, window.expand(3, 5, 5))
    (mean,) = run(model, x, space, [UnitTarget("conv", 0)])
    torch.testing.assert_close(mean.attribution, expected / 9)
    # The model is linear: integrated gradients from black is exactly (x - black) * gradient.
    (ig,) = run(model, x, space, [ClassTarget(0)], method="integrated_gradients", ig_steps=7)
    pixel_zero = [(0.0 - m) / s for m, s in zip(space.mean, space.std, strict=True)]
    black = torch.tensor(pixel_zero).view(3, 1, 1)
    torch.testing.assert_close(ig.attribution, (x[0] - black) * expected, rtol=1e-5, atol=1e-5)


def test_blurred_baseline_matches_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    x = torch.randn(2, 3, 12, 10, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for sigma in (0.7, 2.0, 10.0):  # 10: the kernel is wider than the image
        expected = ndimage.gaussian_filter(x.numpy(), sigma=(0, 0, sigma, sigma), mode="nearest",
                                           truncate=4.0)
        torch.testing.assert_close(gaussian_blur(x, sigma), torch.from_numpy(expected))


@pytest.mark.parametrize(("method", "reference"), [("guided_backprop", GuidedBackprop),
                                                   ("deconvnet", Deconvolution)])
def test_modified_relus_match_captum_on_relu_modules(relu_net, images, space, method, reference):
    results = run(relu_net, images, space, [ClassTarget(c) for c in CLASSES], method=method)
    expected = reference(relu_net).attribute(leaf(images), target=CLASSES)
    close(stacked(results), expected)
    assert all(r.modified_activations == 3 for r in results)
    plain = Saliency(relu_net).attribute(leaf(images), target=CLASSES, abs=False)
    assert differs(stacked(results), plain)


@pytest.mark.parametrize("steps", [16, 50])
def test_integrated_gradients_matches_captum(relu_net, images, space, steps):
    results = run(relu_net, images, space, [ClassTarget(c) for c in CLASSES],
                  method="integrated_gradients", ig_steps=steps)
    black = black_baseline(images, space.mean, space.std)
    expected = IntegratedGradients(relu_net).attribute(images, baselines=black, target=CLASSES,
                                                       n_steps=steps)  # Captum's default: gausslegendre
    close(stacked(results), expected)


def test_integrated_gradients_completeness(relu_net, images, space):
    """Attributions sum to f(x) - f(black) within a few percent (Sundararajan et al.'s axiom)."""
    black = black_baseline(images, space.mean, space.std)
    logits, base_logits = relu_net(images).detach(), relu_net(black).detach()
    for steps in (50, 200):
        results = run(relu_net, images, space, [ClassTarget(c) for c in CLASSES],
                      method="integrated_gradients", ig_steps=steps)
        for i, c in enumerate(CLASSES):
            delta = float(logits[i, c] - base_logits[i, c])
            assert float(results[i].attribution.sum()) == pytest.approx(delta, rel=0.03, abs=1e-3)
            assert results[i].baseline_value == pytest.approx(float(base_logits[i, c]), rel=1e-5, abs=1e-6)


def test_grad_cam_matches_captum(relu_net, images, space):
    layer = relu_net.features[3]  # the stride-2 block's ReLU: an 8x8 map
    results = run(relu_net, images, space, [ClassTarget(c) for c in CLASSES],
                  method="grad_cam", cam_layer="features.3")
    cam = LayerGradCam(relu_net, layer).attribute(leaf(images), target=CLASSES, relu_attributions=True)
    expected = LayerAttribution.interpolate(cam, (16, 16), interpolate_mode="bilinear")
    close(stacked(results), expected)
    close(results[1].heatmap, expected[1, 0])
    assert "features.3" in results[0].notes[0]


def test_guided_grad_cam_matches_captum(relu_net, images, space):
    results = run(relu_net, images, space, [ClassTarget(c) for c in CLASSES],
                  method="guided_grad_cam", cam_layer="features.3")
    expected = GuidedGradCam(relu_net, relu_net.features[3]).attribute(
        leaf(images), target=CLASSES, interpolate_mode="bilinear")  # Captum's default is "nearest"
    close(stacked(results), expected)
    assert results[0].modified_activations == 3


def test_smoothgrad_averages_gradients_over_documented_noise(relu_net, images, space):
    """Reference: the documented noise recipe, then Captum's plain gradient per copy, averaged."""
    samples, noise, seed = 6, 0.2, 7
    results = run(relu_net, images, space, [ClassTarget(c) for c in CLASSES], method="smoothgrad",
                  smooth_samples=samples, smooth_noise=noise, seed=seed)
    scale = torch.tensor([noise / s for s in space.std]).view(3, 1, 1)  # 0.2 * 255 px in input units
    for i, c in enumerate(CLASSES):
        g = torch.Generator().manual_seed(seed)
        copies = torch.stack([images[i] + torch.randn(3, 16, 16, generator=g) * scale
                              for _ in range(samples)])
        expected = Saliency(relu_net).attribute(leaf(copies), target=c, abs=False).mean(dim=0)
        close(results[i].attribution, expected)
    again = run(relu_net, images, space, [ClassTarget(c) for c in CLASSES], method="smoothgrad",
                smooth_samples=samples, smooth_noise=noise, seed=seed)
    assert torch.equal(stacked(results), stacked(again))


def test_smoothgrad_with_zero_noise_is_the_base_method(relu_net, images, space):
    targets = [ClassTarget(c) for c in CLASSES]
    for base in ("gradient", "guided_backprop", "integrated_gradients"):
        smooth = run(relu_net, images, space, targets, method="smoothgrad", smooth_base=base,
                     smooth_samples=2, smooth_noise=0.0, ig_steps=8)
        plain = run(relu_net, images, space, targets, method=base, ig_steps=8)
        close(stacked(smooth), stacked(plain))
