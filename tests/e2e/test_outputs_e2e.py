"""Selectable Saliency outputs through the real server: each output is present iff asked, and equal to the
full answer's; what is not asked is not sent (the answer shrinks); a bad output names its field."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from PIL import Image

from convlens.client import Client, InvalidArgumentError
from convlens.v1 import convlens_pb2 as pb

pytestmark = pytest.mark.slow
OUTPUTS = ("attribution", "heatmap", "overlay", "predictions")


def photo() -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)


def pixels(image: Image.Image | None) -> np.ndarray:
    assert image is not None
    return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("wanted", [(o,) for o in OUTPUTS] + list(itertools.combinations(OUTPUTS, 2)))
def test_each_output_is_there_iff_asked_and_equals_the_full_answer(client: Client, wanted: tuple[str, ...]
                                                                    ) -> None:
    full = client.saliency(photo(), "resnet18", target=3, overlay=True)
    assert full.attribution is not None and full.heatmap is not None and full.overlay is not None
    part = client.saliency(photo(), "resnet18", target=3, outputs=wanted)
    assert (part.attribution is not None) == ("attribution" in wanted)
    assert (part.heatmap is not None) == ("heatmap" in wanted)
    assert (part.overlay is not None) == ("overlay" in wanted)
    assert bool(part.predictions) == ("predictions" in wanted)
    if part.attribution is not None:
        np.testing.assert_allclose(part.attribution, full.attribution, rtol=1e-5, atol=1e-7)
    if part.heatmap is not None:
        np.testing.assert_allclose(part.heatmap, full.heatmap, rtol=1e-5, atol=1e-7)
    if part.overlay is not None:
        assert np.abs(pixels(part.overlay).astype(int) - pixels(full.overlay).astype(int)).max() <= 1
    if part.predictions:
        assert [p.class_index for p in part.predictions] == [p.class_index for p in full.predictions]
        assert [p.logit for p in part.predictions] == pytest.approx([p.logit for p in full.predictions], rel=1e-5)
    # What always comes back, whatever was asked.
    assert part.target == full.target == 3
    assert part.target_value == pytest.approx(full.target_value, rel=1e-5)
    assert part.geometry == full.geometry


def test_the_default_is_unchanged_and_the_answer_shrinks_without_the_tensors(client: Client) -> None:
    default = client.saliency(photo(), "resnet18", target=3, overlay=False)
    assert default.attribution is not None and default.heatmap is not None and default.predictions
    assert default.overlay is None  # the overlay only when asked, as before
    request = pb.SaliencyRequest(model="resnet18", image=pb.Image(encoded=_png(photo())),
                                 target=pb.Target(class_index=3))
    sizes = {}
    for name, outputs in {"default": [], "heatmap": [pb.SALIENCY_OUTPUT_HEATMAP],
                          "predictions": [pb.SALIENCY_OUTPUT_PREDICTIONS]}.items():
        request.ClearField("outputs")
        request.outputs.extend(outputs)
        sizes[name] = client._unary("Saliency", request).ByteSize()  # noqa: SLF001
    # 64-px input: attribution 3*64*64 floats, heatmap 64*64.
    assert sizes["default"] > 4 * 4 * 64 * 64 > sizes["heatmap"] > 4 * 64 * 64 > sizes["predictions"]


@pytest.mark.parametrize("value", [pb.SALIENCY_OUTPUT_UNSPECIFIED, 99])
def test_an_unknown_output_is_invalid_and_names_its_position(client: Client, value: int) -> None:
    request = pb.SaliencyRequest(model="resnet18", image=pb.Image(encoded=_png(photo())),
                                 outputs=[pb.SALIENCY_OUTPUT_HEATMAP, value])
    with pytest.raises(InvalidArgumentError) as e:
        client._unary("Saliency", request)  # noqa: SLF001
    assert [f for f, _ in e.value.field_violations] == ["outputs[1]"]
    assert "SALIENCY_OUTPUT_HEATMAP" in e.value.message
    assert client.saliency(photo(), "resnet18", outputs=["heatmap"]).heatmap is not None  # still healthy


def _png(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()
