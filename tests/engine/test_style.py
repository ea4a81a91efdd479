"""Style transfer engine: Gram matrices and softening against hand computation; the losses; a seeded Adam
job gives the same image alone and batched; L-BFGS runs alone and lowers the loss."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from convlens.server.engine.hooks import leftover_hooks
from convlens.server.engine.layer_features import PixelSpace
from convlens.server.engine.optimize import style as S
from convlens.server.engine.optimize.runner import run_step
from convlens.server.errors import InvalidArgument

SPACE = PixelSpace(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
F2 = torch.tensor([[[1.0, 2.0]], [[3.0, -1.0]]])  # C=2, H=1, W=2


def photo(h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed)) * 255


def test_gram_by_hand() -> None:
    # f0 = (1, 2), f1 = (3, -1): f0.f0 = 5, f0.f1 = 1, f1.f1 = 10
    raw = torch.tensor([[5.0, 1.0], [1.0, 10.0]])
    torch.testing.assert_close(S.gram(F2, "none"), raw)
    torch.testing.assert_close(S.gram(F2, "positions"), raw / 2)
    torch.testing.assert_close(S.gram(F2, "elements"), raw / 4)
    torch.testing.assert_close(S.gram(F2[None].repeat(3, 1, 1, 1), "positions")[2], raw / 2)


def test_soften_by_hand() -> None:
    e = torch.exp
    # channels: at position 0 softmax(1, 3), at position 1 softmax(2, -1), times C = 2
    ch = S.soften(F2, "channels", 1.0)
    torch.testing.assert_close(ch[:, 0, 0], 2 * torch.stack([e(torch.tensor(1.0)), e(torch.tensor(3.0))])
                               / (e(torch.tensor(1.0)) + e(torch.tensor(3.0))))
    torch.testing.assert_close(ch.sum(dim=0), torch.full((1, 2), 2.0))
    pos = S.soften(F2, "positions", 2.0)  # per channel over its 2 positions, temperature 2
    torch.testing.assert_close(pos[0, 0], 2 * torch.softmax(torch.tensor([0.5, 1.0]), 0))
    torch.testing.assert_close(pos.sum(dim=(1, 2)), torch.full((2,), 2.0))
    everything = S.soften(F2, "all", 1.0)
    torch.testing.assert_close(everything.flatten(), 4 * torch.softmax(F2.flatten(), 0))
    assert torch.equal(S.soften(F2, "none"), F2)
    torch.testing.assert_close(S.soften(F2, "all", 1e6), torch.ones_like(F2), atol=1e-4, rtol=0)  # hot: uniform


def test_loss_terms_by_hand() -> None:
    settings = S.StyleSettings(style_layers=("a", "b"), content_layer="b", style_layer_weights=(1.0, 0.5),
                               style_weight=10.0, content_weight=2.0, gram_normalization="none")
    fa_s, fb_s, fb_c = F2, F2 * 2, F2 + 1
    targets = S.targets_from_features(settings, {"a": fa_s, "b": fb_s}, {"b": fb_c})
    x = {"a": F2 * 0, "b": F2}
    terms = S.loss_terms(settings, targets, x)
    ga = torch.tensor([[5.0, 1.0], [1.0, 10.0]])
    style = 1.0 * (ga**2).mean() + 0.5 * ((ga - 4 * ga) ** 2).mean()  # G(0) = 0; G(2f) = 4 G(f); G(x_b) = G(f)
    content = ((F2 - (F2 + 1)) ** 2).mean()
    assert float(terms["style"]) == pytest.approx(float(style))
    assert float(terms["content"]) == pytest.approx(float(content))
    assert float(terms["total"]) == pytest.approx(float(10 * style + 2 * content))


def test_relative_style_distance_by_hand() -> None:
    # one layer, Gram by hand: ||G(x) - G(s)||^2 / ||G(s)||^2, whatever the Gram's normalisation constant
    g_s = torch.tensor([[5.0, 1.0], [1.0, 10.0]])  # G(F2), normalisation "none"
    g_x = torch.tensor([[20.0, 4.0], [4.0, 40.0]])  # G(2 F2) = 4 G(F2)
    expected = float(((g_x - g_s) ** 2).sum() / (g_s**2).sum())  # = 9
    assert expected == pytest.approx(9.0)
    for norm in S.GRAM_NORMALIZATIONS:
        settings = S.StyleSettings(style_layers=("a",), content_layer="a", gram_normalization=norm,
                                   style_distance="relative")
        targets = S.targets_from_features(settings, {"a": F2}, {"a": F2})
        assert float(S.loss_terms(settings, targets, {"a": 2 * F2})["style"]) == pytest.approx(expected)
    mse = S.StyleSettings(style_layers=("a",), content_layer="a", gram_normalization="none")
    mse_terms = S.loss_terms(mse, S.targets_from_features(mse, {"a": F2}, {"a": F2}), {"a": 2 * F2})
    assert float(mse_terms["style"]) == pytest.approx(float(((g_x - g_s) ** 2).mean()))


def test_losses_vanish_at_the_targets(lite_net: nn.Module) -> None:
    settings = S.StyleSettings(style_layers=("_conv_stem", "_blocks.0"), content_layer="_blocks.1", steps=1,
                               size=32, soften="channels")
    image = photo()
    report = run_step(lite_net, [S.start(lite_net, SPACE, image, image, settings)])[0]
    assert report.terms["style"] == pytest.approx(0.0, abs=1e-6)
    assert report.terms["content"] == pytest.approx(0.0, abs=1e-6)


def _settings(**kw: object) -> S.StyleSettings:
    base = S.StyleSettings(style_layers=("_conv_stem", "_blocks.0"), content_layer="_blocks.1", steps=6,
                           size=32, style_weight=100.0, learning_rate=4.0)
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def test_adam_job_same_alone_and_batched(lite_net: nn.Module) -> None:
    # Equal up to rounding: a batched convolution sums in another order, and Adam's sign-like steps
    # amplify that a little where a gradient is near zero, so the bound is a fraction of a pixel level.
    jobs = [(photo(seed=1), photo(seed=2), _settings(init="noise", seed=3, learning_rate=1.0)),
            (photo(seed=4), photo(seed=5), _settings(soften="channels", temperature=2.0, style_weight=1e5,
                                                     learning_rate=1.0)),
            (photo(seed=6), photo(seed=7), _settings(style_weight=1e4, gram_normalization="elements",
                                                     learning_rate=1.0)),
            (photo(seed=8), photo(seed=9), _settings(style_weight=1e3, style_distance="relative",
                                                     learning_rate=1.0))]
    alone = [S.transfer(lite_net, SPACE, c, s, st) for c, s, st in jobs]
    together = [S.start(lite_net, SPACE, c, s, st) for c, s, st in jobs]
    assert len({j.key for j in together}) == 1
    while not together[0].done:
        run_step(lite_net, together)
    for a, b in zip(alone, together, strict=True):
        diff = (a.picture() - b.picture()).abs()
        assert float(diff.max()) < 0.5 and float(diff.mean()) < 0.01
        assert a.losses["total"] == pytest.approx(b.losses["total"], rel=1e-3)
    assert float((alone[0].picture() - alone[1].picture()).abs().mean()) > 10  # the jobs really differ
    assert not any(p.grad is not None for p in lite_net.parameters())  # nothing accumulated in the model
    assert leftover_hooks(lite_net) == []


def test_style_loss_falls_and_seed_repeats(lite_net: nn.Module) -> None:
    content, style = photo(seed=1), photo(seed=2) * 0.3
    settings = _settings(steps=15)
    start_loss = run_step(lite_net, [S.start(lite_net, SPACE, content, style, settings)])[0].terms["style"]
    done = S.transfer(lite_net, SPACE, content, style, settings)
    assert done.losses["style"] < 0.5 * start_loss
    noise = _settings(init="noise", seed=11, steps=2)
    a = S.transfer(lite_net, SPACE, content, style, noise)
    b = S.transfer(lite_net, SPACE, content, style, noise)
    assert torch.equal(a.picture(), b.picture())
    assert float(done.image.detach().min()) >= 0 and float(done.image.detach().max()) <= 255  # Adam clips


def test_lbfgs_lowers_the_loss(lite_net: nn.Module) -> None:
    content, style = photo(seed=1), photo(seed=2) * 0.3
    settings = _settings(optimizer="lbfgs", steps=15)
    first = S.start(lite_net, SPACE, content, style, settings)
    assert first.key != S.start(lite_net, SPACE, content, style, settings).key  # never shares a batch
    start_loss = run_step(lite_net, [first])[0].terms["total"]
    done = S.transfer(lite_net, SPACE, content, style, settings)
    assert done.losses["total"] < 0.6 * start_loss
    assert done.picture().min() >= 0 and done.picture().max() <= 255
    assert leftover_hooks(lite_net) == []


def test_output_size_keeps_the_aspect() -> None:
    assert S.output_size(300, 600, 256) == (128, 256)
    c, s = S.prepare_images(photo(20, 40), photo(50, 25), 64)
    assert tuple(c.shape) == (3, 32, 64) and tuple(s.shape) == (3, 64, 32)


@pytest.mark.parametrize(("change", "field"), [
    ({"style_layers": ()}, "style_layers"), ({"style_layer_weights": (1.0,)}, "style_layer_weights"),
    ({"style_weight": -1.0}, "style_weight"), ({"content_weight": float("inf")}, "content_weight"),
    ({"steps": 0}, "steps"), ({"steps": 10**6}, "steps"), ({"size": 8}, "size"), ({"size": 4096}, "size"),
    ({"init": "zeros"}, "init"), ({"optimizer": "sgd"}, "optimizer"), ({"soften": "x"}, "soften"),
    ({"temperature": 0.0}, "temperature"), ({"gram_normalization": "x"}, "gram_normalization"),
    ({"learning_rate": 0.0}, "learning_rate"), ({"style_distance": "l1"}, "style_distance"),
])
def test_validate_names_the_field(change: dict, field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        S.validate(_settings(**change))
    assert info.value.violations[0].field == field
