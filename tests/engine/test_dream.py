"""DeepDream engine: the pyramid, the objectives and the normalised step against hand computation;
batched steps equal single ones; hooks never leak."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from convlens.server.engine.hooks import leftover_hooks
from convlens.server.engine.layer_features import PixelSpace
from convlens.server.engine.optimize import dream as D
from convlens.server.engine.optimize.job import StepLoss
from convlens.server.engine.optimize.runner import run_step
from convlens.server.errors import InvalidArgument

SPACE = PixelSpace(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))


def photo(h: int = 40, w: int = 48, seed: int = 0) -> torch.Tensor:
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed)) * 255


def test_octave_sizes_smallest_first_and_drop_tiny() -> None:
    sizes = D.octave_sizes(100, 140, 4, 1.4)
    assert sizes[-1] == (100, 140)
    assert sizes[0] == (round(100 / 1.4**3), round(140 / 1.4**3))
    assert [s[0] for s in sizes] == sorted(s[0] for s in sizes)
    assert D.octave_sizes(50, 60, 4, 1.4) == [(round(50 / 1.4), round(60 / 1.4)), (50, 60)]  # 50/1.96 < 32


def test_fit_size_only_shrinks() -> None:
    assert D.fit_size(300, 600, 512) == (256, 512)
    assert D.fit_size(100, 50, 512) == (100, 50)


def test_l2_objective_gradient_is_the_activations() -> None:
    a = torch.randn(4, 3, 5, requires_grad=True)
    D.l2_objective()(a).backward()
    torch.testing.assert_close(a.grad, 2 * a.detach() / a.numel())
    b = a.detach().clone().requires_grad_(True)
    D.l2_objective(channel=2)(b).backward()
    expected = torch.zeros_like(b)
    expected[2] = 2 * b.detach()[2] / 15
    torch.testing.assert_close(b.grad, expected)


def test_guide_objective_by_hand() -> None:
    # Two channels, three positions; guide with two features.
    x = torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 1.0]]).reshape(2, 1, 3).requires_grad_(True)
    y = torch.tensor([[1.0, -1.0], [1.0, 0.5]])  # guide features (columns): (1, 1) and (-1, 0.5)
    # dots: pos0: (1, -1) -> guide 0, 1 ; pos1: (2, 1) -> guide 0, 2 ; pos2: (0, 1.5) -> guide 1, 1.5
    value = D.guide_objective(y.reshape(2, 1, 2))(x)
    assert float(value.detach()) == pytest.approx((1 + 2 + 1.5) / 3)
    value.backward()
    expected = torch.tensor([[1.0, 1.0, -1.0], [1.0, 1.0, 0.5]]) / 3  # the chosen guide feature per position
    torch.testing.assert_close(x.grad.reshape(2, 3), expected)


class Probe(nn.Module):
    """The layer is the normalised input itself: the gradient is computable by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Identity()
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(x).mean(dim=(2, 3)))


def job(image: torch.Tensor, settings: D.DreamSettings, objective: D.LayerObjective | None = None) -> D.DreamJob:
    return D.DreamJob(image, settings, objective or D.l2_objective(), mean=SPACE.mean, std=SPACE.std)


def test_normalised_step_and_clip_by_hand() -> None:
    settings = D.DreamSettings(layer="layer", octaves=1, steps_per_octave=1, jitter=0, step_size=1.5)
    image = photo(32, 36)
    dreamer = job(image, settings)
    report = run_step(Probe().eval(), [dreamer])[0]
    std = torch.tensor(SPACE.std).view(3, 1, 1)
    z = SPACE.normalize(image[None])[0]
    g = 2 * z / z.numel() / (255 * std)  # d mean(z^2) / d pixels
    expected = (image + 1.5 * g / (g.abs().mean() + 1e-8)).clamp(0, 255)  # the core's NormalizedGradient eps
    torch.testing.assert_close(dreamer.picture(), expected, rtol=1e-5, atol=1e-4)
    assert dreamer.done and report.done and report.step == report.total_steps == 1
    assert report.terms["objective"] == pytest.approx(float(z.pow(2).mean()), rel=1e-5)


def test_detail_is_carried_to_the_next_octave() -> None:
    settings = D.DreamSettings(layer="layer", octaves=2, steps_per_octave=1, octave_scale=1.5)
    dreamer = job(photo(48, 60) * 0.7, settings)  # below 245: the +10 is not clipped
    assert dreamer.key == ("dream", "layer", (32, 40))
    with torch.no_grad():
        dreamer.pixels += 10.0  # as if the octave's only step added a constant 10
    dreamer.after_step([], StepLoss(torch.tensor(0.0), {"objective": torch.tensor(0.0)}))
    assert dreamer.octave == 1 and dreamer.key == ("dream", "layer", (48, 60))
    torch.testing.assert_close(dreamer.picture(), (dreamer.bases[1] + 10.0).clamp(0, 255))


def test_batched_steps_equal_single_steps(lite_net: nn.Module) -> None:
    settings = [D.DreamSettings(layer="_blocks.0", octaves=2, steps_per_octave=3, seed=s, jitter=4)
                for s in (1, 2, 3)]
    images = [photo(40, 40, seed=i) for i in range(3)]
    alone = [D.dream(lite_net, im, st, D.l2_objective(), mean=SPACE.mean, std=SPACE.std)
             for im, st in zip(images, settings, strict=True)]
    together = [job(im, st) for im, st in zip(images, settings, strict=True)]
    while not together[0].done:
        assert len({j.key for j in together}) == 1
        run_step(lite_net, together)
    for a, b in zip(alone, together, strict=True):
        torch.testing.assert_close(a.picture(), b.picture(), rtol=0, atol=1e-2)
    assert not torch.allclose(alone[0].picture(), alone[1].picture())
    assert leftover_hooks(lite_net) == []


def test_same_seed_same_dream_and_objective_rises(lite_net: nn.Module) -> None:
    layer = "_blocks.0._depthwise_conv"  # before the ReLU6: the toy net saturates little there
    settings = D.DreamSettings(layer=layer, octaves=2, steps_per_octave=10, jitter=2, seed=7)
    image = photo(48, 48) * 0.2 + 100  # a smooth grey start, far from the clip
    a = D.dream(lite_net, image, settings, D.l2_objective(), mean=SPACE.mean, std=SPACE.std)
    b = D.dream(lite_net, image, settings, D.l2_objective(), mean=SPACE.mean, std=SPACE.std)
    assert torch.equal(a.picture(), b.picture())
    out = a.picture()
    before = D.layer_objective(lite_net, SPACE, D.resize(image, tuple(out.shape[-2:])), layer, D.l2_objective())
    after = D.layer_objective(lite_net, SPACE, out, layer, D.l2_objective())
    assert after > 1.1 * before  # the toy net saturates (ReLU6); Lite0 is measured in docs/quality.md
    assert out.min() >= 0 and out.max() <= 255
    assert a.step == a.total_steps == D.steps_total(48, 48, settings)


def test_guided_dream_moves_toward_the_guide(lite_net: nn.Module) -> None:
    guide = photo(48, 48, seed=5)
    feats = D.guide_features(lite_net, SPACE, guide, "_blocks.1", 48)
    objective = D.guide_objective(feats)
    settings = D.DreamSettings(layer="_blocks.1", octaves=1, steps_per_octave=8, jitter=2)
    image = photo(48, 48)
    dreamer = D.dream(lite_net, image, settings, objective, mean=SPACE.mean, std=SPACE.std)
    before = D.layer_objective(lite_net, SPACE, image, "_blocks.1", objective)
    after = D.layer_objective(lite_net, SPACE, dreamer.picture(), "_blocks.1", objective)
    assert after > before


def test_hooks_removed_after_an_error(lite_net: nn.Module) -> None:
    dreamer = job(photo(), D.DreamSettings(layer="_blocks.0", octaves=1), D.l2_objective(channel=99))
    with pytest.raises(IndexError):
        run_step(lite_net, [dreamer])
    assert leftover_hooks(lite_net) == []


@pytest.mark.parametrize(("change", "field"), [
    ({"octaves": 0}, "octaves"), ({"octaves": 99}, "octaves"), ({"octave_scale": 1.0}, "octave_scale"),
    ({"octave_scale": float("nan")}, "octave_scale"), ({"steps_per_octave": 0}, "steps_per_octave"),
    ({"step_size": 0.0}, "step_size"), ({"jitter": -1}, "jitter"), ({"max_size": 4096}, "max_size"),
    ({"channel": 8}, "channel"),
])
def test_validate_names_the_field(change: dict, field: str) -> None:
    settings = D.DreamSettings(layer="x", **change)
    with pytest.raises(InvalidArgument) as info:
        D.validate(settings, layer_channels=8)
    assert info.value.violations[0].field == field


def test_channel_and_guide_cannot_combine() -> None:
    with pytest.raises(InvalidArgument) as info:
        D.validate(D.DreamSettings(layer="x", channel=1), layer_channels=8, guided=True)
    assert info.value.violations[0].field == "channel"
