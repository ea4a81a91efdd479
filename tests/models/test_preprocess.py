"""Pixels in, input tensor out, with the geometry that maps boxes back onto the caller's image."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from convlens.server.errors import InvalidArgument
from convlens.server.models.model import Preprocess
from convlens.server.models.preprocess import decode_image, denormalize, plan_geometry, prepare

IMAGENET = Preprocess(224, 224, 256, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
LITE = Preprocess(224, 224, 256, (127 / 255,) * 3, (128 / 255,) * 3)


def random_image(h: int, w: int, channels: int | None = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (h, w) if channels is None else (h, w, channels)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def encode(image: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_resize_short_side_then_center_crop() -> None:
    x, geo = prepare(random_image(300, 400), IMAGENET)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    assert (geo.original_height, geo.original_width) == (300, 400)
    assert (geo.resized_height, geo.resized_width) == (256, 341)
    assert (geo.crop_top, geo.crop_left) == (16, 58)
    assert (geo.input_height, geo.input_width) == (224, 224)
    assert geo.scale == pytest.approx(256 / 300)
    # The input's top-left pixel sits at (58, 16) of the resized image = (68, 18.75) of the original.
    assert geo.to_original((0, 0, 224, 224)) == pytest.approx((58 * 400 / 341, 16 * 300 / 256,
                                                                282 * 400 / 341, 240 * 300 / 256))


def test_portrait_and_non_square_inputs() -> None:
    geo = plan_geometry(500, 250, IMAGENET)
    assert (geo.resized_height, geo.resized_width, geo.crop_top, geo.crop_left) == (512, 256, 144, 16)
    tall = Preprocess(96, 64, 72, (0.5,) * 3, (0.5,) * 3)
    x, geo = prepare(random_image(50, 200), tall)
    assert x.shape == (3, 96, 64)
    # A resize below the crop would not fit: the image is scaled up to cover the crop.
    assert geo.resized_height >= 96 and geo.resized_width >= 64


def test_an_image_of_the_input_size_is_used_as_is() -> None:
    image = random_image(224, 224)
    x, geo = prepare(image, LITE)
    assert geo.scale == 1.0 and (geo.crop_top, geo.crop_left) == (0, 0)
    assert (geo.resized_height, geo.resized_width) == (224, 224)
    expected = (torch.from_numpy(image).permute(2, 0, 1).float() - 127) / 128
    assert torch.allclose(x, expected, atol=1e-5)
    assert np.array_equal(denormalize(x, LITE), image)  # exactly the same pixels back
    assert np.array_equal(denormalize(x[None], LITE), image)


def test_grey_rgba_and_float_images() -> None:
    grey = random_image(224, 224, channels=None)
    x, _ = prepare(grey, IMAGENET)
    assert np.array_equal(denormalize(x, IMAGENET), np.repeat(grey[:, :, None], 3, axis=2))
    x1, _ = prepare(grey[:, :, None], IMAGENET)
    assert torch.equal(x, x1)
    rgba = np.concatenate([random_image(224, 224), np.zeros((224, 224, 1), np.uint8)], axis=2)
    x2, _ = prepare(rgba, IMAGENET)
    assert torch.equal(x2, prepare(rgba[:, :, :3], IMAGENET)[0])
    x3, _ = prepare(rgba[:, :, :3].astype(np.float32), IMAGENET)
    assert torch.allclose(x3, x2)


def test_resized_values_stay_in_range() -> None:
    image = np.zeros((100, 100, 3), np.uint8)
    image[::2] = 255  # worst case for bicubic overshoot
    x, _ = prepare(image, LITE)
    pixels = x * 128 + 127
    assert pixels.min() >= -1e-3 and pixels.max() <= 255 + 1e-3


@pytest.mark.parametrize("bad", [np.zeros((4, 4, 2), np.uint8), np.zeros((4, 4, 3), bool),
                                 np.zeros((2, 4, 4, 3), np.uint8), np.zeros((0, 4, 3), np.uint8)])
def test_bad_arrays(bad: np.ndarray) -> None:
    with pytest.raises(InvalidArgument) as err:
        prepare(bad, IMAGENET)
    assert err.value.violations[0].field == "image"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_decode(fmt: str) -> None:
    image = random_image(20, 30)
    decoded = decode_image(encode(image, fmt, quality=100) if fmt != "PNG" else encode(image, fmt))
    assert decoded.shape == (20, 30, 3) and decoded.dtype == np.uint8
    if fmt == "PNG":
        assert np.array_equal(decoded, image)


def test_decode_grey_and_rgba_png() -> None:
    grey = random_image(8, 9, channels=None)
    assert np.array_equal(decode_image(encode(grey, "PNG")), np.repeat(grey[:, :, None], 3, axis=2))
    rgba = random_image(8, 9, channels=4)
    assert np.array_equal(decode_image(encode(rgba, "PNG")), rgba[:, :, :3])


def test_decode_applies_exif_orientation() -> None:
    image = random_image(10, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", exif=exif)
    decoded = decode_image(buf.getvalue())
    assert decoded.shape == (20, 10, 3)
    assert np.array_equal(decoded, np.rot90(image, k=-1))


@pytest.mark.parametrize(("data", "message"), [
    (b"", "empty"),
    (b"this is not an image at all", "not a PNG, JPEG or WebP"),
    (encode(random_image(64, 64), "PNG")[:200], "could not be decoded"),
])
def test_decode_errors(data: bytes, message: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        decode_image(data)
    assert message in err.value.message
    assert err.value.violations[0].field == "image"
