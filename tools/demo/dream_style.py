"""The demo gallery's Dream and StyleTransfer section (called by demo.py): dreams at an early and a late
layer on a few photos, a guided dream, style transfers of content x style pairs, and softening on and off
side by side. The calls are made concurrently, so the server batches their steps as it would for many
callers."""

from __future__ import annotations

import html
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from convlens.client import Client
from tools.common import MODEL, figure, photo

EARLY, LATE = "_blocks.3", None  # None: the server's default dream layer (a stride-16 block)
DREAM_SIZE, STYLE_SIZE, STYLE_STEPS = 256, 224, 200


def _photos() -> dict[str, np.ndarray]:
    names = ("chelsea", "coffee", "astronaut", "brick", "gravel", "grass", "china", "flower")
    return {name: photo(name) for name in names}


def dream_style_section(c: Client, out: Path) -> str:
    photos = _photos()
    calls: dict[str, Any] = {}
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=16) as pool:
        for name in ("chelsea", "coffee", "astronaut"):
            for tag, layer in (("early", EARLY), ("late", LATE)):
                calls[f"dream_{name}_{tag}"] = pool.submit(c.dream, photos[name], MODEL, layer, max_size=DREAM_SIZE,
                                                           timeout=3600)
        calls["dream_guided"] = pool.submit(c.dream, photos["chelsea"], MODEL, guide=photos["flower"],
                                            max_size=DREAM_SIZE, timeout=3600)
        for content, style in (("chelsea", "brick"), ("coffee", "gravel"), ("astronaut", "grass"),
                               ("china", "flower")):
            calls[f"style_{content}_{style}"] = pool.submit(c.style_transfer, photos[content], photos[style], MODEL,
                                                            size=STYLE_SIZE, steps=STYLE_STEPS, timeout=3600)
        for soften in ("none", "channels"):
            calls[f"soften_{soften}"] = pool.submit(c.style_transfer, photos["chelsea"], photos["brick"], MODEL,
                                                    size=STYLE_SIZE, steps=STYLE_STEPS, soften=soften, timeout=3600)
        results = {k: f.result() for k, f in calls.items()}
    took = time.perf_counter() - started
    print(f"dream and style gallery: {len(calls)} calls at once in {took:.0f} s")

    dreams = []
    for name in ("chelsea", "coffee", "astronaut"):
        for tag in ("early", "late"):
            r = results[f"dream_{name}_{tag}"]
            gain = r.objective / r.input_objective if r.input_objective else float("nan")
            dreams.append(figure(out, f"dream_{name}_{tag}.png", r.image,
                                  f"{name}, {r.settings['layer']}: objective x{gain:.1f}"))
    g = results["dream_guided"]
    Image.fromarray(photos["flower"]).save(out / "guide_flower.png")
    dreams.append("<figure><img src='guide_flower.png' height=192><figcaption>guide</figcaption></figure>")
    dreams.append(figure(out, "dream_guided.png", g.image, f"chelsea guided by the flower, {g.settings['layer']}"))
    styles = []
    for key in [k for k in results if k.startswith("style_")]:
        r = results[key]
        _, content, style = key.split("_")
        drop = 1 - r.style_loss / r.initial_style_loss if r.initial_style_loss else float("nan")
        Image.fromarray(photos[style]).save(out / f"style_src_{style}.png")
        styles.append(f"<figure><img src='style_src_{style}.png' height=96><figcaption>{style}</figcaption>"
                      f"</figure>" + figure(out, f"{key}.png", r.image,
                                             f"{content} in {style}'s style (style loss -{drop:.0%})"))
    soft = [figure(out, f"soften_{s}.png", results[f"soften_{s}"].image, f"soften = {s}")
            for s in ("none", "channels")]
    settings = results["style_chelsea_brick"].settings or {}
    return ("<h2>DeepDream</h2><p>google/deepdream's method (4 octaves x 1.4, "
            f"{g.settings.get('steps_per_octave')} steps each (the model's default), normalised step 1.5, "
            f"jitter 32) at an early layer ({EARLY}) and the default late one; last, a dream guided by "
            "another image's features. Objective gains measured by a plain forward pass on the result.</p>"
            + "".join(dreams)
            + "<h2>Style transfer</h2><p>Gatys et al. with the model's defaults "
            f"(style layers {html.escape(', '.join(settings.get('style_layers', [])))}, content "
            f"{html.escape(str(settings.get('content_layer')))}, soften {settings.get('soften')}, Adam, "
            f"{STYLE_STEPS} steps, {STYLE_SIZE} px).</p>" + "".join(styles)
            + "<h3>Softening (Wang et al., CVPR 2021) off and on</h3>" + "".join(soft)
            + f"<p>{len(calls)} calls made at once: {took:.0f} s.</p>")
