"""A sample's result does not depend on its batch: mixed target kinds in one batch equal one-at-a-time.

Tolerance: rtol 1e-5 and atol 1e-5 of the map's largest magnitude. oneDNN picks batch-size-dependent
conv kernels, so in float32 the same image differs in the last bits between batch sizes (seen: up to
4e-6 relative on a deconvnet map of magnitude 10); a sample leaking into another would differ by percents.
"""

from __future__ import annotations

import pytest
import torch

from convlens.server.engine.integrated_gradients import black_baseline, integrated_gradients
from convlens.server.engine.saliency import SaliencyOptions, saliency
from convlens.server.engine.smoothgrad import smoothgrad
from convlens.server.engine.targets import ClassTarget, UnitTarget

pytestmark = pytest.mark.filterwarnings("ignore:Setting backward hooks:UserWarning")

MIXED = [
    ClassTarget(2),
    UnitTarget("_blocks.0._bn0", channel=4, y=3, x=5),  # one unit
    UnitTarget("_blocks.1", channel=1),  # a channel's mean
    UnitTarget("_bn1", channel=7, reduction="max"),  # a channel's max
    None,  # top-1 class
]
OPTIONS = [
    SaliencyOptions(method="gradient"),
    SaliencyOptions(method="guided_backprop"),
    SaliencyOptions(method="deconvnet"),
    SaliencyOptions(method="smoothgrad", smooth_samples=10, seed=3),  # 50 rows: chunks of 32 split them
    SaliencyOptions(method="smoothgrad", smooth_base="guided_backprop", smooth_samples=4, seed=3),
    SaliencyOptions(method="smoothgrad", smooth_base="integrated_gradients", smooth_samples=2, ig_steps=9),
    SaliencyOptions(method="integrated_gradients", ig_steps=20),
    SaliencyOptions(method="integrated_gradients", ig_steps=20, ig_baseline="blurred", ig_blur_sigma=2.0),
    SaliencyOptions(method="grad_cam"),
    SaliencyOptions(method="guided_grad_cam", cam_layer="_blocks.1"),
]


def same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    expected = expected.detach()
    atol = 1e-5 * float(expected.abs().max()) + 1e-12
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=atol)


@pytest.fixture
def batch() -> torch.Tensor:
    return torch.randn(len(MIXED), 3, 16, 16, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: f"{o.method}-{o.smooth_base}-{o.ig_baseline}")
def test_mixed_batch_equals_one_at_a_time(lite_net, batch, space, options):
    together = saliency(lite_net, batch, MIXED, options, space)
    for i, target in enumerate(MIXED):
        (alone,) = saliency(lite_net, batch[i:i + 1], [target], options, space)
        same(together[i].attribution, alone.attribution)
        same(together[i].heatmap, alone.heatmap)
        assert together[i].target == alone.target
        assert together[i].target_value == pytest.approx(alone.target_value, rel=1e-5, abs=1e-6)
    assert isinstance(together[4].target, ClassTarget)
    assert together[4].target.index == int(lite_net(batch[4:5]).argmax())


def test_image_baseline_per_sample(lite_net, batch, space):
    baselines = torch.randn(batch.shape, generator=torch.Generator().manual_seed(9))
    options = SaliencyOptions(method="integrated_gradients", ig_steps=10, ig_baseline="image")
    together = saliency(lite_net, batch, MIXED, options, space, baselines=baselines)
    for i in (0, 3):
        (alone,) = saliency(lite_net, batch[i:i + 1], [MIXED[i]], options, space,
                            baselines=baselines[i:i + 1])
        same(together[i].attribution, alone.attribution)


def test_callers_train_flags_are_restored_and_eval_is_used(lite_net, batch, space):
    expected = saliency(lite_net, batch, MIXED, SaliencyOptions(), space)
    lite_net.train()
    lite_net._blocks[1].eval()  # a mixed state must come back exactly
    flags = {name: m.training for name, m in lite_net.named_modules()}
    got = saliency(lite_net, batch, MIXED, SaliencyOptions(), space)
    assert {name: m.training for name, m in lite_net.named_modules()} == flags
    for g, e in zip(got, expected, strict=True):
        same(g.attribution, e.attribution)
    assert lite_net._bn0.num_batches_tracked.item() == 0  # running stats untouched


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_chunking_does_not_change_results(relu_net, space, chunk):
    """Groups of rows straddle chunk boundaries (IG: 5 rows per image; SmoothGrad-IG: 2 x 5 rows)."""
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    targets = [ClassTarget(0), UnitTarget("features.2", 1, y=2, x=2), ClassTarget(4)]
    black = black_baseline(x, space.mean, space.std)
    whole = integrated_gradients(relu_net, x, targets, black, steps=5, chunk=64)
    same(integrated_gradients(relu_net, x, targets, black, steps=5, chunk=chunk), whole)
    kwargs = {"samples": 2, "noise": 0.1, "std": space.std, "seed": 4, "baselines": black, "steps": 5}
    for base in ("gradient", "integrated_gradients"):
        smooth, _ = smoothgrad(relu_net, x, targets, base=base, chunk=64, **kwargs)
        chunked, _ = smoothgrad(relu_net, x, targets, base=base, chunk=chunk, **kwargs)
        same(chunked, smooth)
