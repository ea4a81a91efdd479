"""A top photo with its receptive-field box drawn so a reader sees it at the size the unit page shows it.

The server sends the photo without a box (TopActivations' "photos" output, at most 640 px) and the box in
original-image pixels; the atlas draws the box itself: the photo outside the box dimmed, and a ring around
the box (bright, with a dark edge) whose width is a few pixels *as displayed* (the page shows a photo at
most DISPLAY_WIDTH x DISPLAY_HEIGHT, see _assets.CSS `.photo img`), so a 19-px box of an early layer on a
512-px photo shown at 220 px is still plain to see. The box's own pixels are left as they are.
"""

from __future__ import annotations

import math

from PIL import Image, ImageDraw

from .._types import Geometry

DISPLAY_WIDTH, DISPLAY_HEIGHT = 300, 220  # the largest a unit page shows a photo (CSS px)
RING = 3  # the bright ring's width as displayed (CSS px)
EDGE = 1  # the dark edge outside it, as displayed
DIM = 0.5  # brightness kept outside the box
BRIGHT = (255, 214, 0)
DARK = (0, 0, 0)

Box = tuple[int, int, int, int]


def display_scale(size: tuple[int, int]) -> float:
    """CSS px per image px when the page shows an image of `size` (never enlarged)."""
    return min(1.0, DISPLAY_WIDTH / size[0], DISPLAY_HEIGHT / size[1])


def photo_box(photo_size: tuple[int, int], original_box: Box, geometry: Geometry | None) -> Box:
    """`original_box` (original-image pixels) in the pixels of the photo sent (downscaled to <= 640 px)."""
    scale = photo_size[0] / geometry.original_width if geometry is not None and geometry.original_width else 1.0
    x0, y0, x1, y1 = original_box
    w, h = photo_size
    bx0, by0 = min(w - 1, max(0, math.floor(x0 * scale))), min(h - 1, max(0, math.floor(y0 * scale)))
    bx1, by1 = max(bx0 + 1, min(w, math.ceil(x1 * scale))), max(by0 + 1, min(h, math.ceil(y1 * scale)))
    return bx0, by0, bx1, by1


def ring_widths(photo_size: tuple[int, int]) -> tuple[int, int]:
    """The bright ring's and the dark edge's widths in image pixels, RING and EDGE CSS px as displayed."""
    s = display_scale(photo_size)
    return max(2, math.ceil(RING / s)), max(1, math.ceil(EDGE / s))


def draw_region(photo: Image.Image, box: Box) -> Image.Image:
    """A copy of `photo` (RGB) with `box` (photo pixels, x1/y1 exclusive) shown: outside dimmed, a ring
    around it. Where the box touches the photo's edge the ring runs along the inside of that edge."""
    image = photo.convert("RGB")
    x0, y0, x1, y1 = box
    inside = image.crop(box)
    image = Image.eval(image, lambda v: int(v * DIM))
    image.paste(inside, (x0, y0))
    ring, edge = ring_widths(image.size)
    draw = ImageDraw.Draw(image)
    w, h = image.size
    for pad, width, colour in ((ring + edge, edge, DARK), (ring, ring, BRIGHT)):
        outer = [max(0, x0 - pad), max(0, y0 - pad), min(w, x1 + pad) - 1, min(h, y1 + pad) - 1]
        draw.rectangle(outer, outline=colour, width=width)
    return image
