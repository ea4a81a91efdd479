"""Image parameterisations: what the optimiser changes, and how it becomes an RGB image in [0, 1].

Every parameterisation holds `count` images ([count, 3, H, W], default 1) on one device, exposes its leaf tensors as
`params` (what gradients and optimiser state are for) and renders with `image()`, differentiably.

- `PixelParam`: the pixels themselves, stored centred (image - 0.5) so L2 decay pulls toward grey and
  zeroing a pixel makes it grey; `project()` clips back to the valid range after each update (the
  lecture's recipe, Yosinski et al. 2015).
- `FourierParam`: Lucid's spectrum with 1/frequency scaling and decorrelated colour, through a sigmoid
  (Olah et al. 2017; Lucent's `fft_image` + `to_valid_rgb`).
- `MacoParam`: only the spectrum's phase is optimised; the magnitude is fixed to the average spectrum of
  natural photos (Fel et al. 2023), computed from the photos our dependencies embed (natural_spectrum.py).
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

# Lucid's colour correlation (square root of the ImageNet colour covariance, from its SVD).
COLOR_CORRELATION_SVD_SQRT = torch.tensor([[0.26, 0.09, 0.02],
                                           [0.27, 0.00, -0.05],
                                           [0.27, -0.09, 0.03]])
_MAX_NORM = COLOR_CORRELATION_SVD_SQRT.norm(dim=0).max()
COLOR_CORRELATION = COLOR_CORRELATION_SVD_SQRT / _MAX_NORM  # columns of norm <= 1, as Lucid normalises


class ImageParam(Protocol):
    params: list[torch.Tensor]  # leaf tensors with requires_grad

    def image(self) -> torch.Tensor:
        """[count, 3, H, W] in [0, 1], differentiable with respect to `params`."""
        ...

    def project(self) -> None:
        """Bring the parameters back to their valid set after an update (a no-op for most)."""
        ...


def recorrelate(t: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] from the decorrelated colour space to RGB (Lucid's `_linear_decorrelate_color`)."""
    matrix = COLOR_CORRELATION.to(t.device, t.dtype)
    return torch.einsum("nchw,dc->ndhw", t, matrix)


def decorrelate(rgb: torch.Tensor) -> torch.Tensor:
    """The inverse of `recorrelate`."""
    matrix = torch.linalg.inv(COLOR_CORRELATION.double()).to(rgb.device, rgb.dtype)
    return torch.einsum("nchw,dc->ndhw", rgb, matrix)


def rfft2_frequencies(h: int, w: int) -> torch.Tensor:
    """[h, w // 2 + 1] radial frequency of each rfft2 bin, in cycles per pixel."""
    fy = torch.fft.fftfreq(h)[:, None]
    fx = torch.fft.rfftfreq(w)[None, :]
    return torch.sqrt(fx * fx + fy * fy)


class PixelParam:
    def __init__(self, size: int, generator: torch.Generator, device: torch.device, *,
                 init_std: float = 0.01, count: int = 1) -> None:
        noise = torch.randn(count, 3, size, size, generator=generator) * init_std
        self.pixels = noise.to(device).requires_grad_(True)
        self.params = [self.pixels]

    def image(self) -> torch.Tensor:
        return self.pixels + 0.5

    @torch.no_grad()
    def project(self) -> None:
        self.pixels.clamp_(-0.5, 0.5)


class FourierParam:
    """Lucent's `fft_image` (sd 0.01, decay power 1, divided by 4) then decorrelated colour and a sigmoid."""

    MAGIC = 4.0

    def __init__(self, size: int, generator: torch.Generator, device: torch.device, *,
                 init_std: float = 0.01, decay_power: float = 1.0, count: int = 1) -> None:
        self.size = size
        freqs = rfft2_frequencies(size, size)
        self.scale = (1.0 / torch.clamp(freqs, min=1.0 / size) ** decay_power)[None, None, :, :, None].to(device)
        spectrum = torch.randn(count, 3, *freqs.shape, 2, generator=generator) * init_std
        self.spectrum = spectrum.to(device).requires_grad_(True)
        self.params = [self.spectrum]

    def image(self) -> torch.Tensor:
        scaled = torch.view_as_complex((self.scale * self.spectrum).contiguous())
        t = torch.fft.irfftn(scaled, s=(self.size, self.size), norm="ortho") / self.MAGIC
        return torch.sigmoid(recorrelate(t))

    def project(self) -> None:
        pass


class MacoParam:
    """Phase-only: spectrum = magnitude * e^{i phase}; the image standardised, recorrelated, sigmoid.

    `magnitude` is [3, H, W // 2 + 1] in the decorrelated colour space (natural_spectrum.average_magnitude).
    """

    def __init__(self, magnitude: torch.Tensor, generator: torch.Generator, device: torch.device, *,
                 init_std: float = 1.0, count: int = 1) -> None:
        self.size = magnitude.shape[-2]
        self.magnitude = magnitude.to(device)[None]
        phase = torch.randn(count, *magnitude.shape, generator=generator) * init_std
        self.phase = phase.to(device).requires_grad_(True)
        self.params = [self.phase]

    def image(self) -> torch.Tensor:
        spectrum = torch.polar(self.magnitude.expand_as(self.phase), self.phase)
        t = torch.fft.irfftn(spectrum, s=(self.size, self.size), norm="ortho")
        # The magnitude fixes the shape of the spectrum, not its scale: standardise each image.
        if t.shape[0] == 1:
            t = (t - t.mean()) / (t.std() + 1e-5)
        else:
            dims = (1, 2, 3)
            t = (t - t.mean(dim=dims, keepdim=True)) / (t.std(dim=dims, keepdim=True) + 1e-5)
        return torch.sigmoid(recorrelate(t))

    @torch.no_grad()
    def project(self) -> None:
        self.phase.remainder_(2 * math.pi)  # keeps the numbers small; the image is unchanged
