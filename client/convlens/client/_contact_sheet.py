"""A contact sheet of a unit's top entries: each crop (or boxed photo) with its score and source."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

from ._types import TopActivation

CELL = 160
LABEL = 30


def contact_sheet(entries: Sequence[TopActivation], *, title: str = "", columns: int = 0,
                  use_images: bool = False) -> Image.Image:
    """Cells of CELL px, best first, row-major; each cell shows the crop (or the boxed image) and below it
    the score and the image's name. Entries without pixels get a grey cell."""
    n = max(1, len(entries))
    cols = columns or min(n, 3 if n <= 9 else 4 if n <= 16 else 8)
    rows = (n + cols - 1) // cols
    top = LABEL if title else 0
    sheet = Image.new("RGB", (cols * CELL, top + rows * (CELL + LABEL)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    if title:
        draw.text((6, 8), title, fill=(0, 0, 0), font=font)
    for i, e in enumerate(entries):
        x, y = (i % cols) * CELL, top + (i // cols) * (CELL + LABEL)
        picture = (e.image if use_images else e.crop) or e.crop or e.image
        if picture is None:
            draw.rectangle([x + 4, y + 4, x + CELL - 5, y + CELL - 5], fill=(200, 200, 200))
        else:
            fitted = picture.convert("RGB")
            fitted.thumbnail((CELL - 8, CELL - 8), Image.Resampling.LANCZOS)
            if max(fitted.size) < CELL - 8:  # small crops (early layers) are enlarged, pixels kept sharp
                s = (CELL - 8) / max(fitted.size)
                fitted = fitted.resize((max(1, round(fitted.width * s)), max(1, round(fitted.height * s))),
                                       Image.Resampling.NEAREST)
            sheet.paste(fitted, (x + (CELL - fitted.width) // 2, y + (CELL - fitted.height) // 2))
        name = e.source.rsplit("/", 1)[-1]
        draw.text((x + 6, y + CELL + 2), f"#{i + 1}  {e.score:.3g}", fill=(0, 0, 0), font=font)
        draw.text((x + 6, y + CELL + 15), name[:24], fill=(90, 90, 90), font=font)
    return sheet
