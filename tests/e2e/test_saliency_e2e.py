"""Saliency through the real server: realism on the embedded model, batching equality, SDK shapes."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from skimage import data

from convlens.client import AsyncClient, Client, Unit
from convlens.server.launcher import ServerProcess

pytestmark = pytest.mark.slow
CAT_CLASSES = {281, 282, 285}  # tabby, tiger cat, Egyptian cat
LITE0_RELU6 = 33  # stem + 1 in block 0 + 2 in each of blocks 1..15 + head


def test_chelsea_is_a_cat_and_the_gradient_explains_the_top_class(client: Client) -> None:
    s = client.saliency(data.chelsea(), "efficientnet_lite0", method="gradient", overlay=True)
    top3 = [p.class_index for p in s.predictions[:3]]
    assert CAT_CLASSES & set(top3), s.predictions
    assert s.target == s.predictions[0].class_index
    assert s.target_value == pytest.approx(s.predictions[0].logit, rel=1e-4)
    assert s.attribution.shape == (3, 224, 224) and s.heatmap.shape == (224, 224)
    assert s.overlay is not None and s.overlay.size == (224, 224)
    g = s.geometry
    assert (g.original_height, g.original_width) == (300, 451)
    assert g.input_height == 224 and g.crop_top >= 0 and g.resized_height == 256
    assert s.modified_activations == 0


def test_guided_backprop_modifies_every_relu6_and_differs_from_the_gradient(client: Client) -> None:
    cat = data.chelsea()
    plain = client.saliency(cat, "efficientnet_lite0", target=281, method="gradient")
    guided = client.saliency(cat, "efficientnet_lite0", target=281, method="guided_backprop")
    assert guided.modified_activations == LITE0_RELU6
    assert not np.allclose(plain.attribution, guided.attribution, atol=1e-6)
    deconv = client.saliency(cat, "efficientnet_lite0", target=281, method="deconvnet")
    assert deconv.modified_activations == LITE0_RELU6


def test_grad_cam_on_the_cat_peaks_on_the_cat(client: Client) -> None:
    s = client.saliency(data.chelsea(), "efficientnet_lite0", target=281, method="grad_cam")
    h = s.heatmap
    assert h.min() >= 0 and h.max() > 0
    # The cat fills the centre of chelsea's crop; the CAM mass there beats the border strip.
    centre = h[56:168, 56:168].mean()
    border = np.concatenate([h[:20].ravel(), h[-20:].ravel()]).mean()
    assert centre > border


def test_integrated_gradients_are_complete_through_the_service(client: Client) -> None:
    """Completeness within 5%. On this ReLU6 net the path integrand jumps near the black baseline, so
    it takes ~256 Gauss-Legendre steps (measured: +20% at 64, -4% at 128, +1% at 256)."""
    cat = data.chelsea()
    s = client.saliency(cat, "efficientnet_lite0", target=281, method="integrated_gradients", steps=256)
    black = client.saliency(np.zeros((224, 224, 3), np.uint8), "efficientnet_lite0", target=281,
                            method="gradient")
    assert s.baseline_value == pytest.approx(black.target_value, rel=1e-4)  # the black baseline, served
    delta = s.target_value - black.target_value
    assert s.attribution.sum() == pytest.approx(delta, rel=0.05)


def test_a_request_alone_equals_the_same_request_inside_a_mixed_batch(server: ServerProcess) -> None:
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(4)]
    targets: list[int | Unit | None] = [281, None, 7, 500]

    async def run() -> tuple[list, list]:
        async with AsyncClient(server.address, timeout=120) as c:
            alone = [await c.saliency(im, "efficientnet_lite0", target=t, method="guided_backprop")
                     for im, t in zip(images, targets, strict=True)]
            together = await asyncio.gather(*[c.saliency(im, "efficientnet_lite0", target=t,
                                                         method="guided_backprop")
                                              for im, t in zip(images, targets, strict=True)])
            return alone, list(together)

    alone, together = asyncio.run(run())
    for a, b in zip(alone, together, strict=True):
        scale = float(np.abs(a.attribution).max())
        np.testing.assert_allclose(b.attribution, a.attribution, rtol=1e-4, atol=1e-5 * scale)
        assert a.target == b.target
