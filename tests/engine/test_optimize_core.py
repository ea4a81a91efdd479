"""The optimisation core's pieces, each against something independent: torch.optim.Adam, hand-computed
shapes and percentiles, natural photos' spectrum falling with frequency."""

from __future__ import annotations

import pytest
import torch

from convlens.server.engine.optimize import regularizers, transforms
from convlens.server.engine.optimize.natural_spectrum import average_magnitude
from convlens.server.engine.optimize.objectives import (
    Activations,
    ChannelMax,
    ChannelMean,
    ClassLogit,
    Custom,
    LayerL2,
    UnitActivation,
)
from convlens.server.engine.optimize.optimizers import Adam, NormalizedGradient
from convlens.server.engine.optimize.param import (
    FourierParam,
    MacoParam,
    PixelParam,
    decorrelate,
    recorrelate,
    rfft2_frequencies,
)


def test_stacked_adam_with_per_row_steps_equals_separate_adams():
    g = torch.Generator().manual_seed(0)
    starts = [torch.randn(2, 3, 5, generator=g) for _ in range(3)]
    lrs = [0.05, 0.1, 0.01]
    ours = [Adam(lr) for lr in lrs]
    mine = [s.clone() for s in starts]
    theirs = [s.clone().requires_grad_(True) for s in starts]
    reference = [torch.optim.Adam([t], lr=lr) for t, lr in zip(theirs, lrs, strict=True)]
    # Job 0 runs 6 steps, job 1 joins at step 2, job 2 at step 4: rows of one stack have different counts.
    for step in range(6):
        active = [i for i, start in enumerate((0, 2, 4)) if step >= start]
        grads = {i: torch.randn(2, 3, 5, generator=g) for i in active}
        Adam.step_many([ours[i] for i in active], [[mine[i]] for i in active], [[grads[i]] for i in active])
        for i in active:
            theirs[i].grad = grads[i].clone()
            reference[i].step()
    assert [o.steps for o in ours] == [6, 4, 2]
    for m, t in zip(mine, theirs, strict=True):
        torch.testing.assert_close(m, t.detach(), rtol=1e-5, atol=1e-6)


def test_normalized_gradient_is_deepdreams_step():
    p = torch.ones(4)
    g = torch.tensor([1.0, -2.0, 3.0, -2.0])
    NormalizedGradient(1.5).step([p], [g])
    torch.testing.assert_close(p, 1 - 1.5 * g / 2.0)


@pytest.mark.parametrize("make", [
    lambda g: PixelParam(16, g, torch.device("cpu")),
    lambda g: FourierParam(16, g, torch.device("cpu")),
    lambda g: MacoParam(average_magnitude(16), g, torch.device("cpu")),
])
def test_parameterisations_render_valid_images_and_are_seeded(make):
    a, b = make(torch.Generator().manual_seed(3)), make(torch.Generator().manual_seed(3))
    other = make(torch.Generator().manual_seed(4))
    image = a.image()
    values = image.detach()
    assert image.shape == (1, 3, 16, 16)
    assert 0.0 <= float(values.min()) and float(values.max()) <= 1.0
    torch.testing.assert_close(image, b.image(), rtol=0, atol=0)
    assert not torch.equal(image, other.image())
    image.sum().backward()  # differentiable with respect to the parameters
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in a.params)


def test_colour_decorrelation_round_trips():
    x = torch.rand(2, 3, 4, 4)
    torch.testing.assert_close(recorrelate(decorrelate(x)), x, rtol=1e-5, atol=1e-5)


def test_fourier_param_scales_the_spectrum_by_one_over_frequency():
    p = FourierParam(32, torch.Generator().manual_seed(0), torch.device("cpu"))
    freqs = rfft2_frequencies(32, 32)
    expected = 1.0 / torch.clamp(freqs, min=1 / 32)
    torch.testing.assert_close(p.scale[0, 0, :, :, 0], expected)


def test_natural_spectrum_falls_with_frequency_and_is_cached():
    magnitude = average_magnitude(64)
    assert magnitude.shape == (3, 64, 33)
    assert average_magnitude(64) is magnitude
    freqs = rfft2_frequencies(64, 64)
    low = magnitude[:, (freqs > 0) & (freqs < 0.05)].mean()
    high = magnitude[:, freqs > 0.4].mean()
    assert low > 10 * high  # natural photos: roughly 1/f


def test_transform_output_sizes_match_what_they_produce():
    chain = transforms.standard(pad=3, jitter=4, scale=0.1, degrees=10, final_jitter=2)
    out = transforms.apply(chain, torch.rand(1, 3, 20, 20), torch.Generator().manual_seed(0))
    assert out.shape[-1] == transforms.output_size(chain, 20) == 20 + 6 - 4 - 2


def test_transforms_depend_only_on_the_generator():
    chain = transforms.standard()
    image = torch.rand(1, 3, 32, 32)
    a = transforms.apply(chain, image, torch.Generator().manual_seed(5))
    b = transforms.apply(chain, image, torch.Generator().manual_seed(5))
    c = transforms.apply(chain, image, torch.Generator().manual_seed(6))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)


def test_scale_rotate_keeps_the_centre_and_is_identity_when_disabled():
    image = torch.rand(1, 3, 9, 9)
    assert transforms.ScaleRotate(0.0, 0.0)(image, torch.Generator()) is image
    for seed in range(5):  # any zoom and rotation about the centre leaves the centre pixel where it is
        out = transforms.ScaleRotate(0.2, 30.0)(image, torch.Generator().manual_seed(seed))
        assert out.shape == image.shape
        torch.testing.assert_close(out[..., 4, 4], image[..., 4, 4], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(out, image)


def test_jitter_is_a_crop_at_the_drawn_offset():
    image = torch.arange(36.0).view(1, 1, 6, 6)
    g = torch.Generator().manual_seed(1)
    dy, dx = (int(v) for v in torch.randint(0, 3, (2,), generator=torch.Generator().manual_seed(1)))
    out = transforms.Jitter(2)(image, g)
    torch.testing.assert_close(out, image[..., dy:dy + 4, dx:dx + 4])


def test_regularisers_by_hand():
    x = torch.tensor([[[[1.0, -2.0], [0.5, 4.0]]]]).repeat(1, 3, 1, 1)
    y = x.clone()
    regularizers.decay(y, 0.1)
    torch.testing.assert_close(y, 0.9 * x)
    y = x.clone()
    regularizers.zero_small_values(y, 50.0)  # norms sqrt(3)*|v|: the two smallest go
    assert (y[0, :, 0, 0] == 0).all() and (y[0, :, 1, 0] == 0).all()
    assert (y[0, :, 0, 1] == x[0, :, 0, 1]).all() and (y[0, :, 1, 1] == x[0, :, 1, 1]).all()
    grad = torch.tensor([[[[1.0, 0.01], [10.0, 0.0]]]]).repeat(1, 3, 1, 1)
    y = x.clone()
    regularizers.zero_small_contributions(y, grad, 50.0)  # |x*g|: 3, 0.06, 15, 0 -> the 0.06 and 0 go
    assert (y[0, :, 0, 1] == 0).all() and (y[0, :, 1, 1] == 0).all() and (y[0, :, 1, 0] == 0.5).all()
    flat = torch.full((1, 3, 8, 8), 0.3)
    regularizers.blur(flat, 1.0)
    torch.testing.assert_close(flat, torch.full((1, 3, 8, 8), 0.3))
    assert float(regularizers.total_variation(torch.full((1, 3, 4, 4), 0.7))) == 0.0
    ramp = torch.arange(4.0).view(1, 1, 1, 4).expand(1, 1, 4, 4)
    assert float(regularizers.total_variation(ramp)) == pytest.approx(1.0)


def test_objectives_read_their_row_and_compose():
    logits = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    layer = torch.arange(2 * 2 * 3 * 3, dtype=torch.float32).view(2, 2, 3, 3)
    acts = Activations(logits, {"l": layer})
    assert float(ClassLogit(1)(acts, 1)) == 4.0
    assert float(UnitActivation("l", 1, 2, 0)(acts, 0)) == float(layer[0, 1, 2, 0])
    assert float(ChannelMean("l", 0)(acts, 1)) == float(layer[1, 0].mean())
    assert float(ChannelMax("l", 1)(acts, 1)) == float(layer[1, 1].max())
    assert float(LayerL2("l")(acts, 0)) == pytest.approx(float(0.5 * (layer[0] ** 2).mean()))
    combo = 2.0 * ClassLogit(0) - ChannelMean("l", 0) + Custom("c", {"m"}, lambda a, r: torch.tensor(1.0))
    assert combo.layers == frozenset({"l", "m"})
    assert float(combo(acts, 1)) == pytest.approx(2 * 3.0 - float(layer[1, 0].mean()) + 1.0)
    assert set(combo.terms(acts, 1)) == {"logit[0]", "l[0].mean", "c"}
    assert float((-ClassLogit(0))(acts, 0)) == -1.0
