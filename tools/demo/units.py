"""The demo's "units" section: what excites units of an early and a late block (and, in the gallery, a middle
block and a few classes of the logits layer), as the top regions of the `samples` photos with their scores,
each beside the whole photo with the receptive-field box drawn. The queries are sent at once: the first
query of a layer builds its index (one scan of the photos, shared by that layer's queries)."""

from __future__ import annotations

import html
from collections.abc import Callable
from concurrent.futures import Executor, Future
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from convlens.client import Client, TopActivation, TopActivations
from tools.common import MODEL
from tools.demo.profile import Profile

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


def start_units(c: Client, pool: Executor, out: Path, p: Profile) -> Callable[[], str]:
    """Send the queries; the returned function waits for them and renders the section."""
    labels = c.get_model(MODEL).labels
    calls: dict[tuple[str, int], Future[TopActivations]] = {
        (layer, ch): pool.submit(c.top_activations, MODEL, layer, ch, k=K, dataset="samples", crops=True,
                                 include_images=True, timeout=900)
        for layer, _, channels in p.units for ch in channels}

    def render() -> str:
        parts = ["<h2>Units: the dataset regions that excite them most</h2><p>Top regions of the "
                 "<code>samples</code> photos for units of EfficientNet-Lite0 (ranked by each photo's spatial max, "
                 "one region per photo). Top row: the receptive field of the strongest position, cut from the "
                 "original photo, with the activation; bottom row: the whole photo with that box.</p>"]
        for layer, what, channels in p.units:
            figures = []
            for ch in channels:
                top = calls[(layer, ch)].result()
                name = f"unit_{layer.replace('.', '_')}_{ch}.png"
                unit_strip(list(top)).save(out / name)
                title = f"class {ch} ({labels[ch]})" if layer == "_fc" else f"channel {ch}"
                s = top.stats
                stats = "" if s is None or layer == "_fc" else (f"; mean {s.mean:.2f}, {s.positive_fraction:.0%} "
                                                                 "of positions > 0")
                figures.append(f"<figure><img src='{name}'><figcaption>{html.escape(title)}{stats}</figcaption>"
                               "</figure>")
            parts.append(f"<h3>{layer}: {html.escape(what)}</h3>" + "".join(figures))
        return "".join(parts)

    return render
