"""From request pixels to a model's input tensor and back, remembering the geometry in between.

The geometry is what lets a receptive-field box at the model's input be drawn on the caller's image.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from convlens.server.errors import InvalidArgument
from convlens.server.models.model import Preprocess

# What decode_image accepts; a short list keeps rarely used (and rarely audited) decoders out.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")


@dataclass(frozen=True)
class Geometry:
    """Where the model input came from: original -> resized (short side) -> center crop (input)."""

    original_height: int
    original_width: int
    resized_height: int
    resized_width: int
    crop_top: int
    crop_left: int
    input_height: int
    input_width: int
    scale: float  # resized / original

    def to_original(self, box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        """A half-open (x0, y0, x1, y1) box in input pixels, in original-image pixels (unclipped)."""
        x0, y0, x1, y1 = box
        sy = self.resized_height / self.original_height
        sx = self.resized_width / self.original_width
        return ((x0 + self.crop_left) / sx, (y0 + self.crop_top) / sy,
                (x1 + self.crop_left) / sx, (y1 + self.crop_top) / sy)


def as_rgb(image: np.ndarray, *, field: str = "image") -> np.ndarray:
    """HxWx3 RGB from HxW / HxWx1 grey, HxWx3, or HxWx4 RGBA (alpha dropped). Keeps the dtype."""
    if not isinstance(image, np.ndarray):
        raise InvalidArgument(f"image must be a numpy array, got {type(image).__name__}", field=field)
    if image.dtype == np.bool_ or not (np.issubdtype(image.dtype, np.integer)
                                       or np.issubdtype(image.dtype, np.floating)):
        raise InvalidArgument(f"image dtype {image.dtype} is not a pixel type (uint8 or float 0..255)",
                              field=field)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise InvalidArgument(
            f"image must be HxW, HxWx1, HxWx3 or HxWx4, got shape {tuple(image.shape)}", field=field)
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise InvalidArgument(f"image is empty: shape {tuple(image.shape)}", field=field)
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    elif image.shape[2] == 4:
        image = image[:, :, :3]
    return image


def plan_geometry(height: int, width: int, pre: Preprocess) -> Geometry:
    """Resize the short side to `pre.resize` (never below the crop), then center-crop to the input."""
    if (height, width) == (pre.height, pre.width):
        return Geometry(height, width, height, width, 0, 0, height, width, 1.0)
    scale = max(pre.resize / min(height, width), pre.height / height, pre.width / width)
    rh = max(pre.height, int(round(height * scale)))
    rw = max(pre.width, int(round(width * scale)))
    # torchvision's CenterCrop rounding, so crops agree with torchvision pipelines.
    top = int(round((rh - pre.height) / 2.0))
    left = int(round((rw - pre.width) / 2.0))
    return Geometry(height, width, rh, rw, top, left, pre.height, pre.width, scale)


def prepare(image: np.ndarray, pre: Preprocess) -> tuple[torch.Tensor, Geometry]:
    """Normalised float32 [3, H, W] input for one 0..255 RGB image, and how it was cut out."""
    rgb = as_rgb(image)
    geo = plan_geometry(rgb.shape[0], rgb.shape[1], pre)
    # Float input may stray outside 0..255; the model was trained on pixels inside it.
    pixels = np.clip(rgb.astype(np.float32, copy=False), 0.0, 255.0)  # H, W, 3
    if (geo.resized_height, geo.resized_width) != (geo.original_height, geo.original_width):
        # Antialiased bicubic matches PIL's resize closely; bicubic overshoots, hence the clamp.
        x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)[None]
        x = F.interpolate(x, size=(geo.resized_height, geo.resized_width), mode="bicubic",
                          align_corners=False, antialias=True)[0].clamp_(0.0, 255.0)
        pixels = x.permute(1, 2, 0).numpy()
    crop = pixels[geo.crop_top:geo.crop_top + geo.input_height, geo.crop_left:geo.crop_left + geo.input_width]
    # Normalised in numpy: torch would start an intra-op thread team here, on the request's thread, that
    # competes with the device worker's for the same cores.
    mean = np.asarray(pre.mean, dtype=np.float32) * 255.0
    std = np.asarray(pre.std, dtype=np.float32) * 255.0
    normalised = ((crop - mean) / std).transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(normalised, dtype=np.float32)), geo


def denormalize(tensor: torch.Tensor, pre: Preprocess) -> np.ndarray:
    """The uint8 HxWx3 picture of a normalised [3, H, W] (or [1, 3, H, W]) input, clipped to 0..255."""
    t = tensor.detach().to("cpu", torch.float32)
    if t.ndim == 4 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 3 or t.shape[0] != 3:
        raise ValueError(f"expected [3, H, W] or [1, 3, H, W], got {tuple(tensor.shape)}")
    mean = torch.tensor(pre.mean).view(3, 1, 1)
    std = torch.tensor(pre.std).view(3, 1, 1)
    pixels = ((t * std + mean) * 255.0).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(1, 2, 0).numpy().copy()


def decode_image(data: bytes, *, field: str = "image") -> np.ndarray:
    """HxWx3 uint8 RGB from encoded PNG / JPEG / WebP (BMP, GIF too), EXIF orientation applied."""
    if not data:
        raise InvalidArgument("image is empty (0 bytes)", field=field)
    try:
        with warnings.catch_warnings():
            # Turn PIL's "possible decompression bomb" warning into its error, and report it.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:
                upright = ImageOps.exif_transpose(img)
                return np.asarray(upright.convert("RGB")).copy()
    except UnidentifiedImageError:
        raise InvalidArgument(
            f"image bytes ({len(data)} bytes) are not a PNG, JPEG or WebP image", field=field) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidArgument(f"image is too large to decode: {exc}", field=field) from None
    except (OSError, ValueError, SyntaxError) as exc:
        # Truncated or corrupt data is only found while decoding the pixels.
        raise InvalidArgument(f"image could not be decoded: {exc}", field=field) from None
