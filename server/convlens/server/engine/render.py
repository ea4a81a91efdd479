"""Pictures: filter grids, heatmaps and overlays (numpy + PIL, no torch needed by callers)."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image

# Anchor colours of a perceptually ordered map (black → purple → orange → pale yellow, like "inferno").
_HEAT_ANCHORS = np.array(
    [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32
)


DEAD_FRAME = (230, 40, 40)


def encode_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# How filter_grid maps each filter's weights to 0..1: its own min..max, or -max|w|..max|w| (0 is grey).
SCALINGS = ("minmax", "symmetric")


def _scale(w: np.ndarray, scaling: str) -> np.ndarray:
    """Map one filter's weights to 0..1."""
    if scaling not in SCALINGS:
        raise ValueError(f"unknown scaling {scaling!r}; use one of {', '.join(SCALINGS)}")
    if scaling == "symmetric":
        m = float(np.abs(w).max())
        return np.full_like(w, 0.5) if m == 0 else 0.5 + 0.5 * w / m
    lo, hi = float(w.min()), float(w.max())
    return np.full_like(w, 0.5) if hi == lo else (w - lo) / (hi - lo)


def filter_grid(
    weights: np.ndarray,
    *,
    scaling: str = "minmax",
    max_filters: int = 64,
    max_input_channels: int = 16,
    cell_scale: int | None = None,
    dead: Sequence[int] = (),
) -> Image.Image:
    """A grid image of conv filters [out, in, kh, kw]; `dead` filters get a red frame.

    Three input channels: one RGB tile per filter, in a square-ish grid (first-layer filters).
    One input channel (depthwise): one grey tile per filter, square-ish grid.
    Otherwise: one row per filter, one grey tile per input channel (the first `max_input_channels`),
    each row scaled on its own so a filter's channels compare with each other.
    """
    out_c, in_c, kh, kw = weights.shape
    n = min(out_c, max_filters)
    scale = cell_scale or max(1, 32 // max(kh, kw))
    pad = max(1, scale // 4)
    th, tw = kh * scale, kw * scale

    if in_c in (1, 3):
        tiles = [_scale(weights[i], scaling) for i in range(n)]  # [in, kh, kw] each
        cols = int(np.ceil(np.sqrt(n)))
        rows = int(np.ceil(n / cols))
        positions = [(i, i // cols, i % cols, tiles[i]) for i in range(n)]
    else:
        # Scaled per filter (across its input channels), not per tile: a 1x1 tile alone is one value
        # and would always come out mid-grey.
        m = min(in_c, max_input_channels)
        rows, cols = n, m
        scaled = [_scale(weights[i, :m], scaling) for i in range(n)]
        positions = [(i, i, j, scaled[i][j][None]) for i in range(n) for j in range(m)]

    # A blue-grey frame: white and black tiles both stay visible against it.
    canvas = np.empty((rows * (th + pad) + pad, cols * (tw + pad) + pad, 3), dtype=np.uint8)
    canvas[:] = (48, 64, 96)
    dead_set = set(dead)
    for i, r, c, tile in positions:
        rgb = np.repeat(tile, 3, axis=0) if tile.shape[0] == 1 else tile
        img = (np.transpose(rgb, (1, 2, 0)) * 255).round().clip(0, 255).astype(np.uint8)
        img = np.kron(img, np.ones((scale, scale, 1), dtype=np.uint8))  # nearest upscaling: crisp pixels
        y0, x0 = pad + r * (th + pad), pad + c * (tw + pad)
        if i in dead_set:  # the frame around the tile: this filter's output never reaches the next layer
            canvas[y0 - pad : y0 + th + pad, x0 - pad : x0 + tw + pad] = DEAD_FRAME
        canvas[y0 : y0 + th, x0 : x0 + tw] = img
    return Image.fromarray(canvas)


def colorize(heatmap: np.ndarray) -> np.ndarray:
    """[H, W] non-negative map → [H, W, 3] uint8, normalised to its own maximum."""
    h = np.nan_to_num(heatmap.astype(np.float32))
    h = h - h.min()
    peak = float(h.max())
    t = h / peak if peak > 0 else h
    pos = t * (len(_HEAT_ANCHORS) - 1)
    i = np.clip(pos.astype(np.int64), 0, len(_HEAT_ANCHORS) - 2)
    f = (pos - i)[..., None]
    rgb = _HEAT_ANCHORS[i] * (1 - f) + _HEAT_ANCHORS[i + 1] * f
    out: np.ndarray = rgb.round().clip(0, 255).astype(np.uint8)
    return out


def blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a [H, W] map, edges repeated."""
    radius = max(1, int(3 * sigma + 0.5))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    out = np.pad(image.astype(np.float32), radius, mode="edge")
    out = np.apply_along_axis(lambda r: np.convolve(r, k, mode="valid"), 1, out)
    return np.apply_along_axis(lambda c: np.convolve(c, k, mode="valid"), 0, out)


def overlay(image: np.ndarray, heatmap: np.ndarray, *, smooth: float = 0.0, alpha: float = 0.75) -> Image.Image:
    """The model-input image [H, W, 3] uint8, greyed, with the coloured heatmap blended on top.

    Pixel attributions are sparse speckle: `smooth` (a Gaussian sigma in pixels) turns them into regions
    a reader can see, and the map is scaled to its 99th percentile so a few extreme pixels do not wash
    the rest out. Where the map is strong the colour covers the image; where it is weak the image shows.
    """
    h = np.abs(heatmap.astype(np.float32))
    if smooth > 0:
        h = blur(h, smooth)
    cap = float(np.percentile(h, 99))
    t = np.clip(h / cap, 0, 1) if cap > 0 else np.zeros_like(h)
    heat = colorize(t).astype(np.float32)
    grey = image.astype(np.float32).mean(axis=2, keepdims=True)
    base = 0.35 * image.astype(np.float32) + 0.45 * grey  # desaturated and darker: the colour carries the map
    weight = alpha * t[..., None] ** 0.7
    out = base * (1 - weight) + heat * weight
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8))
