"""MACO's fixed magnitude must not carry the photos' border artefact (a cross on the frequency axes)."""

from __future__ import annotations

import torch

from convlens.server.engine.optimize.natural_spectrum import average_magnitude


def axis_to_ring_ratio(magnitude: torch.Tensor) -> float:
    """Mean over radii 8..59 of (magnitude on a frequency axis) / (median of the ring at that radius)."""
    size = magnitude.shape[1]
    fy = torch.fft.fftfreq(size)[:, None] * size
    fx = torch.fft.rfftfreq(size)[None, :] * size
    radius = (fy**2 + fx**2).sqrt().round()
    m = magnitude.mean(0)
    ratios = []
    for k in range(8, 60):
        ring = m[(radius == k) & (fy.abs() > 2) & (fx > 2)].median()
        ratios += [float(m[k, 0] / ring), float(m[0, k] / ring)]
    return sum(ratios) / len(ratios)


def test_frequency_axes_are_not_boosted_by_photo_borders() -> None:
    # Unwindowed photos gave 1.98 here (a visible grid in every MACO picture); windowed 1.36, the rest being
    # the photos' real horizontal/vertical structure.
    assert axis_to_ring_ratio(average_magnitude(224)) < 1.6


def test_spectrum_is_cached_and_positive() -> None:
    m = average_magnitude(64)
    assert m.shape == (3, 64, 33) and bool((m > 0).all())
    assert average_magnitude(64) is m
