"""Turn whatever image a caller holds into a `convlens.v1.Image`, and PNG bytes back into PIL images.

Rules (the contract accepts encoded PNG/JPEG/WebP bytes, or a raw [H, W], [H, W, 1], [H, W, 3] tensor of
uint8 or float32 on the 0..255 scale):
- bytes: sent as is (already encoded; the server sniffs the format).
- path: a PNG/JPEG/WebP file is sent byte for byte (no re-encoding loss); any other format PIL reads is
  re-encoded as PNG.
- PIL image: encoded losslessly as PNG (RGB or L; other modes are converted to RGB).
- numpy array: sent raw, uint8 as uint8 and floats as float32, so nothing is quantised on the way.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from convlens.v1 import convlens_pb2 as pb
from convlens.wire.tensors import to_tensor

from ._types import ImageInput

# Magic numbers of the formats the server decodes itself.
_PNG = b"\x89PNG\r\n\x1a\n"
_JPEG = b"\xff\xd8\xff"


def _is_server_format(head: bytes) -> bool:
    return head.startswith(_PNG) or head.startswith(_JPEG) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def to_image(image: ImageInput, *, what: str = "image") -> pb.Image:
    """Coerce one image input; `what` names the argument in error messages."""
    if isinstance(image, bytes | bytearray | memoryview):
        data = bytes(image)
        if not data:
            raise ValueError(f"{what}: empty bytes")
        return pb.Image(encoded=data)
    if isinstance(image, str | os.PathLike):
        return _from_path(Path(image), what)
    if isinstance(image, Image.Image):
        return pb.Image(encoded=pil_to_png(image))
    if isinstance(image, np.ndarray):
        return pb.Image(tensor=to_tensor(_check_array(image, what)))
    raise TypeError(f"{what}: expected a path, PIL image, numpy array or encoded bytes, "
                    f"not {type(image).__name__}")


def _from_path(path: Path, what: str) -> pb.Image:
    data = path.read_bytes()
    if _is_server_format(data[:16]):
        return pb.Image(encoded=data)
    try:
        with Image.open(io.BytesIO(data)) as img:
            return pb.Image(encoded=pil_to_png(img))
    except OSError as e:  # PIL's UnidentifiedImageError is an OSError
        raise ValueError(f"{what}: {path} is not an image PIL can read ({e})") from e


def pil_to_png(img: Image.Image) -> bytes:
    if img.mode not in ("RGB", "L"):
        # The model wants RGB; alpha, palettes and CMYK are flattened here rather than guessed at there.
        img = img.convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _check_array(arr: npt.NDArray[Any], what: str) -> npt.NDArray[Any]:
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]  # drop alpha, as for PIL images
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 3))):
        raise ValueError(f"{what}: array shape {arr.shape} is not HW or HWC with 1, 3 or 4 channels "
                         "(channels-first arrays must be transposed to HWC)")
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ValueError(f"{what}: integer pixels must lie in 0..255")
        return arr.astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        f = arr.astype(np.float32)
        if not np.isfinite(f).all():
            raise ValueError(f"{what}: pixels must be finite")
        if f.size and (f.min() < 0 or f.max() > 255):
            raise ValueError(f"{what}: float pixels must lie on the 0..255 scale")
        if f.size and f.max() <= 1.0 and f.max() > 0:
            # Almost certainly a 0..1 image; sent as is it would arrive nearly black.
            warnings.warn(f"{what}: float pixels are all <= 1; ConvLens expects the 0..255 scale",
                          stacklevel=4)
        return f
    raise ValueError(f"{what}: unsupported dtype {arr.dtype}")


def png_to_pil(data: bytes) -> Image.Image | None:
    """Decode an optional PNG field (empty: absent), fully loaded so nothing stays open."""
    if not data:
        return None
    img = Image.open(io.BytesIO(data))
    img.load()
    return img
