"""Caller images as model inputs: decode (if encoded), bound the size, resize + crop + normalise."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from convlens.server.errors import InvalidArgument
from convlens.server.models.model import ServedModel
from convlens.server.models.preprocess import Geometry, decode_image, prepare

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
    tensor, geometry = prepare(to_array(image, field_name), model.preprocess)
    return PreparedImage(tensor, geometry)
