"""The demo gallery's "units" section: what excites units of an early, a middle and a late block (and a few
classes of the logits layer), as the top regions of the `samples` photos with their scores, each beside the
whole photo with the receptive-field box drawn. Everything through the SDK against a live server."""

from __future__ import annotations

import html
import time
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from convlens.client import Client, TopActivation
from tools.common import MODEL

# (layer, what it is, channels): an early, a middle and a late block, then class logits.
UNITS = (
    ("_blocks.2", "early block (receptive field 19 px)", (3, 7, 11, 19)),
    ("_blocks.7", "middle block (147 px)", (5, 21, 40, 66)),
    ("_blocks.14", "late block (787 px: most of the photo)", (8, 30, 77, 150)),
    ("_fc", "logits: classes", (967, 285, 417, 812)),
)
K = 5
CELL = 112


def unit_strip(entries: list[TopActivation]) -> Image.Image:
    """Two rows: the top crops (cut from the original photos) with scores, and the photos with the box."""
    strip = Image.new("RGB", (K * (CELL + 6), 2 * CELL + 34), "white")
    draw = ImageDraw.Draw(strip)
    font = ImageFont.load_default()
    for i, e in enumerate(entries):
        x = i * (CELL + 6)
        for row, picture in ((0, e.crop), (1, e.image)):
            if picture is None:
                continue
            p = picture.convert("RGB")
            s = CELL / max(p.size)
            p = p.resize((max(1, round(p.width * s)), max(1, round(p.height * s))),
                         Image.Resampling.LANCZOS if s < 1 else Image.Resampling.NEAREST)
            strip.paste(p, (x + (CELL - p.width) // 2, row * (CELL + 17) + (CELL - p.height) // 2))
        draw.text((x + 2, CELL + 2), f"{e.score:.2f} {e.source.rsplit('/', 1)[-1][:14]}", fill="black",
                  font=font)
    return strip


def units_section(c: Client, out: Path) -> str:
    """HTML for the section; the pictures go to `out`. The first query of each layer builds its index."""
    labels = c.get_model(MODEL).labels
    parts = ["<h2>Units: the dataset regions that excite them most</h2><p>Top regions of the "
             "<code>samples</code> photos for units of EfficientNet-Lite0 (ranked by each photo's spatial max, "
             "one region per photo). Top row: the receptive field of the strongest position, cut from the "
             "original photo, with the activation; bottom row: the whole photo with that box.</p>"]
    for layer, what, channels in UNITS:
        t0 = time.perf_counter()
        figures = []
        for ch in channels:
            top = c.top_activations(MODEL, layer, ch, k=K, dataset="samples", crops=True, include_images=True,
                                    timeout=900)
            name = f"unit_{layer.replace('.', '_')}_{ch}.png"
            unit_strip(list(top)).save(out / name)
            title = f"class {ch} ({labels[ch]})" if layer == "_fc" else f"channel {ch}"
            s = top.stats
            stats = "" if s is None else (f"; mean {s.mean:.2f}, {s.positive_fraction:.0%} of positions > 0"
                                          if layer != "_fc" else "")
            figures.append(f"<figure><img src='{name}'><figcaption>{html.escape(title)}{stats}</figcaption>"
                           "</figure>")
        parts.append(f"<h3>{layer}: {html.escape(what)}</h3><p>{time.perf_counter() - t0:.1f} s for "
                     f"{len(channels)} units (the first query scans the photos once for the whole layer)</p>"
                     + "".join(figures))
        print(f"units {layer}: {time.perf_counter() - t0:.1f} s")
    return "".join(parts)
