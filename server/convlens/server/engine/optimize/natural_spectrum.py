"""The average Fourier magnitude of natural photos, for MACO: computed from the photos scikit-image and
scikit-learn ship inside their wheels (never downloaded), once per size, then cached in memory.

Each photo is cropped to a centred square, resized to the requested side, put on the 0..1 scale and
into the decorrelated colour space (MacoParam recorrelates after the inverse transform), windowed, and its
rfft2 magnitude is averaged over photos.

The window matters: an unwindowed photo is periodic only in the FFT's imagination, and its border jump puts
energy on the two frequency axes (about 2x their neighbours here), which MACO's fixed magnitude then forces
into every picture as a faint horizontal/vertical grid. A Hann window (mean kept, energy restored) removes it.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from convlens.server.engine.optimize.param import decorrelate


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from skimage import data

        image = getattr(data, name)()
        picked: np.ndarray = image[0] if isinstance(image, tuple) else image  # stereo_motorcycle: (left, right, disp)
        return picked

    return load


def _sklearn(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        sample: np.ndarray = load_sample_image(name)
        return sample

    return load


# Colour photos of natural scenes (the synthetic colorwheel and the grey images are left out).
PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": _skimage("astronaut"), "chelsea": _skimage("chelsea"), "coffee": _skimage("coffee"),
    "rocket": _skimage("rocket"), "stereo_motorcycle": _skimage("stereo_motorcycle"),
    "hubble_deep_field": _skimage("hubble_deep_field"),
    "immunohistochemistry": _skimage("immunohistochemistry"), "retina": _skimage("retina"),
    "china": _sklearn("china.jpg"), "flower": _sklearn("flower.jpg"),
}


def _square(image: np.ndarray, size: int) -> torch.Tensor:
    """[1, 3, size, size] on 0..1 from an [H, W, 3] uint8 photo: centred square crop, area resize."""
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = np.ascontiguousarray(image[top:top + side, left:left + side, :3])
    t = torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 255.0
    return F.interpolate(t, size=(size, size), mode="area") if side >= size else \
        F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)


def _windowed(t: torch.Tensor) -> torch.Tensor:
    """`t` [1, C, S, S] under a 2-D Hann window: the mean kept, the varying part's energy unchanged."""
    size = t.shape[-1]
    hann = torch.hann_window(size, periodic=False, dtype=t.dtype)
    window = hann[:, None] * hann[None, :]
    mean = t.mean(dim=(-2, -1), keepdim=True)
    return (t - mean) * window / window.pow(2).mean().sqrt() + mean


@lru_cache(maxsize=8)
def average_magnitude(size: int) -> torch.Tensor:
    """[3, size, size // 2 + 1] float32 on the CPU; the same tensor for every call with `size`."""
    total = torch.zeros(3, size, size // 2 + 1, dtype=torch.float64)
    for load in PHOTOS.values():
        t = _windowed(decorrelate(_square(load(), size)).double())
        total += torch.fft.rfft2(t, norm="ortho").abs()[0]
    magnitude = (total / len(PHOTOS)).float()
    magnitude.requires_grad_(False)
    return magnitude
