"""Comparison helpers shared by the saliency tests."""

from __future__ import annotations

import torch

CLASSES = [1, 3, 0]


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """rtol 1e-4, atol 1e-5 of the reference's largest magnitude: scale-free, tight for tiny maps."""
    expected = expected.detach()
    atol = 1e-5 * float(expected.abs().max()) + 1e-12
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=atol)


def differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Clearly different: by more than 1% of the larger map's magnitude somewhere."""
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max()) > 0.01 * max(float(a.abs().max()), float(b.abs().max()))


def leaf(x: torch.Tensor) -> torch.Tensor:
    """Captum warns when it has to set requires_grad itself."""
    return x.clone().requires_grad_(True)
