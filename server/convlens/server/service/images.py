"""Caller images as model inputs: decode (if encoded), bound the size, resize + crop + normalise."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from convlens.server.errors import InvalidArgument
from convlens.server.models.model import ServedModel
from convlens.server.models.preprocess import Geometry, decode_image, plan_geometry, prepare

ImageInput = bytes | np.ndarray  # encoded bytes, or a raw [H, W(, C)] array on the 0..255 scale
MAX_IMAGE_PIXELS = 40_000_000


@dataclass
class PreparedImage:
    tensor: torch.Tensor  # normalised [3, H, W]
    geometry: Geometry


def to_array(image: ImageInput, field_name: str) -> np.ndarray:
    """The caller's image as an [H, W(, C)] array on the 0..255 scale, size-checked. Runs off the event loop."""
    if isinstance(image, bytes | bytearray):
        if not image:
            raise InvalidArgument("image bytes are empty", field=field_name)
        array = decode_image(bytes(image), field=field_name)
    else:
        array = image
    if array.shape[0] * array.shape[1] > MAX_IMAGE_PIXELS:
        raise InvalidArgument(
            f"image is {array.shape[1]}x{array.shape[0]}; at most {MAX_IMAGE_PIXELS} pixels are accepted, "
            "resize it first", field=field_name)
    return array


def prepare_image(model: ServedModel, image: ImageInput, field_name: str) -> PreparedImage:
    """Decode (if needed), resize + crop + normalise for `model`. Runs off the event loop."""
    array = to_array(image, field_name)
    check_resized(array.shape[0], array.shape[1], model, field_name)
    tensor, geometry = prepare(array, model.preprocess)
    return PreparedImage(tensor, geometry)


def check_resized(height: int, width: int, model: ServedModel, field_name: str) -> None:
    """The short side is resized to the model's, so an extreme aspect ratio is upscaled along its long side
    too: a 1 x 65,535 tensor (196 kB) would become 256 x 16.8 M float pixels (51 GB) for a 256 px model
    (issue #15). Refused when the resized image would exceed MAX_IMAGE_PIXELS."""
    geo = plan_geometry(height, width, model.preprocess)
    if geo.resized_height * geo.resized_width > MAX_IMAGE_PIXELS:
        raise InvalidArgument(
            f"image is {width}x{height}; resizing its short side to the model's {model.preprocess.resize} px makes "
            f"it {geo.resized_width}x{geo.resized_height}, over {MAX_IMAGE_PIXELS} pixels: crop it to a less "
            "extreme aspect ratio first", field=field_name)
