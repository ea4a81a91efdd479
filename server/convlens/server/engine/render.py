"""Pictures: filter grids, heatmaps and overlays (numpy + PIL, no torch needed by callers)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# Anchor colours of a perceptually ordered map (black → purple → orange → pale yellow, like "inferno").
_HEAT_ANCHORS = np.array(
    [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32
)


def encode_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _scale(w: np.ndarray, scaling: str) -> np.ndarray:
    """Map one filter's weights to 0..1."""
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
) -> Image.Image:
    """A grid image of conv filters [out, in, kh, kw].

    Three input channels: one RGB tile per filter, in a square-ish grid (first-layer filters).
    One input channel (depthwise): one grey tile per filter, square-ish grid.
    Otherwise: one row per filter, one grey tile per input channel.
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
        positions = [(i // cols, i % cols, tiles[i]) for i in range(n)]
    else:
        m = min(in_c, max_input_channels)
        rows, cols = n, m
        positions = [(i, j, _scale(weights[i, j][None], scaling)) for i in range(n) for j in range(m)]

    canvas = np.full((rows * (th + pad) + pad, cols * (tw + pad) + pad, 3), 255, dtype=np.uint8)
    for r, c, tile in positions:
        rgb = np.repeat(tile, 3, axis=0) if tile.shape[0] == 1 else tile
        img = (np.transpose(rgb, (1, 2, 0)) * 255).round().clip(0, 255).astype(np.uint8)
        img = np.kron(img, np.ones((scale, scale, 1), dtype=np.uint8))  # nearest upscaling: crisp pixels
        y0, x0 = pad + r * (th + pad), pad + c * (tw + pad)
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
    return rgb.round().clip(0, 255).astype(np.uint8)


def overlay(image: np.ndarray, heatmap: np.ndarray, *, alpha: float = 0.6) -> Image.Image:
    """The model-input image [H, W, 3] uint8 with the coloured heatmap blended on top.

    Pixel attributions are sparse, so they are clipped at their 99.5th percentile first;
    otherwise a few extreme pixels would wash the rest out to black.
    """
    h = heatmap.astype(np.float32)
    cap = float(np.percentile(h, 99.5))
    if cap > 0:
        h = np.clip(h, 0, cap)
    heat = colorize(h).astype(np.float32)
    weight = alpha * (h / cap if cap > 0 else h)[..., None] ** 0.5
    base = image.astype(np.float32) * 0.8
    out = base * (1 - weight) + heat * weight
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8))
