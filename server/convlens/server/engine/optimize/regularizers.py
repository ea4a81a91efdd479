"""Regularisers: what keeps an optimised image looking like an image.

Two kinds. In-place operations on a `PixelParam`'s centred pixels, applied after an update (Yosinski et
al. 2015, the lecture's "update, blur a little, zero small pixels, repeat"): `decay`, `blur`,
`zero_small_values`, `zero_small_contributions`. And a differentiable penalty added to a loss:
`total_variation`.
"""

from __future__ import annotations

import torch

from convlens.server.engine.integrated_gradients import gaussian_blur


@torch.no_grad()
def decay(pixels: torch.Tensor, l2: float) -> None:
    """The gradient step of -l2 * ||x||^2 / 2 folded into the pixels: x <- (1 - l2) x."""
    if l2 > 0:
        pixels.mul_(1.0 - l2)


@torch.no_grad()
def blur(pixels: torch.Tensor, sigma: float) -> None:
    """Gaussian blur of [N, C, H, W] in place (edges repeated)."""
    if sigma > 0:
        pixels.copy_(gaussian_blur(pixels, sigma))


def _below_percentile(score: torch.Tensor, percentile: float) -> torch.Tensor:
    """[N, 1, H, W] mask of pixels whose score [N, H, W] is below its image's `percentile`."""
    flat = score.flatten(1)
    threshold = torch.quantile(flat, percentile / 100.0, dim=1, keepdim=True)
    return (flat < threshold).view(score.shape).unsqueeze(1)


@torch.no_grad()
def zero_small_values(pixels: torch.Tensor, percentile: float) -> None:
    """Zero (grey, for centred pixels) the pixels whose colour norm is below the percentile."""
    if percentile > 0:
        pixels.masked_fill_(_below_percentile(pixels.norm(dim=1), percentile), 0.0)


@torch.no_grad()
def zero_small_contributions(pixels: torch.Tensor, grad: torch.Tensor, percentile: float) -> None:
    """Zero the pixels whose contribution |sum_c x * d(objective)/dx| (the first-order change of the
    objective if the pixel went to zero) is below the percentile."""
    if percentile > 0:
        contribution = (pixels * grad).sum(dim=1).abs()
        pixels.masked_fill_(_below_percentile(contribution, percentile), 0.0)


def total_variation(image: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels of [N, C, H, W] (a scalar)."""
    dy = (image[..., 1:, :] - image[..., :-1, :]).abs().mean()
    dx = (image[..., :, 1:] - image[..., :, :-1]).abs().mean()
    return dy + dx
