"""The demo gallery's MaximizeUnit section (called by demo.py): class visualisations of the lecture's
classes with the `lucid` and `lecture` presets side by side, and channel visualisations at an early, a
middle and a late block. All calls run concurrently, so the server batches their steps (its step
scheduler) as it would for many callers."""

from __future__ import annotations

import html
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from convlens.client import Client, Unit
from tools.common import MODEL, figure

CLASSES = {130: "flamingo", 144: "pelican", 351: "hartebeest", 736: "pool table", 302: "ground beetle",
           63: "Indian cobra", 436: "beach wagon", 100: "black swan", 1: "goldfish", 967: "espresso"}
PRESETS = ("lucid", "lecture")
# (block, channels): an early, a middle and a late block of Lite0.
CHANNELS = (("_blocks.2", (3, 7)), ("_blocks.8", (5, 20)), ("_blocks.14", (11, 40)))
STEPS, SIZE = 128, 224


def maximize_section(c: Client, out: Path, steps: int = STEPS, size: int = SIZE) -> str:
    started = time.monotonic()
    calls: dict[str, tuple[Any, dict[str, Any]]] = {}
    for index in CLASSES:
        for preset in PRESETS:
            calls[f"max_{preset}_{index}.png"] = (index, {"preset": preset})
    for layer, channels in CHANNELS:
        for ch in channels:
            calls[f"max_{layer.replace('.', '_')}_{ch}.png"] = (Unit(layer, ch), {"preset": "lucid"})
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = {name: pool.submit(c.maximize_unit, MODEL, target, steps=steps, size=size, seed=0,
                                     timeout=3600, **opts) for name, (target, opts) in calls.items()}
        results = {name: f.result() for name, f in futures.items()}
    rows = []
    for index, label in CLASSES.items():
        cells = []
        for preset in PRESETS:
            name = f"max_{preset}_{index}.png"
            r = results[name]
            top = r.predictions[0]
            cells.append(figure(out, name, r.image, f"{preset}: logit {r.objective:.1f}; top-1 {top.label} "
                                               f"{top.probability:.0%}", 160))
        rows.append(f"<div class='row'><b>{index} {html.escape(label)}</b>{''.join(cells)}</div>")
    units = []
    for layer, channels in CHANNELS:
        for ch in channels:
            name = f"max_{layer.replace('.', '_')}_{ch}.png"
            units.append(figure(out, name, results[name].image, f"{layer} channel {ch} (mean)", 160))
    took = time.monotonic() - started
    return (f"<h2>MaximizeUnit: images that excite a class or a channel</h2><p>{len(calls)} optimisations "
            f"of {steps} steps at {size} px, run at once ({took:.0f} s): the server stepped them together. "
            "Left: the <code>lucid</code> preset (Fourier, decorrelated colour, transforms); right: the "
            "<code>lecture</code> preset (pixels, L2, blur, small-pixel zeroing, jitter).</p>"
            f"{''.join(rows)}<h3>Channels at an early, a middle and a late block</h3>"
            f"<div class='row'>{''.join(units)}</div>")
