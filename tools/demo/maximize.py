"""The demo's MaximizeUnit section: class visualisations (every preset side by side in the gallery) and
channel visualisations of a few blocks. The calls are sent at once, beside the other optimisations, so the
server's step scheduler batches their steps as it would for many callers."""

from __future__ import annotations

import html
from collections.abc import Callable
from concurrent.futures import Executor, Future
from pathlib import Path

from convlens.client import Client, MaximizeResult, Unit
from tools.common import MODEL, figure
from tools.demo.profile import CLASSES, Profile

PRESET_NOTES = {
    "lucid": "Fourier parameterisation, decorrelated colour, transforms",
    "maco": "phase-only optimisation under a natural magnitude spectrum",
    "lecture": "pixels, L2, blur, small-pixel zeroing, jitter",
}


def _channel_file(layer: str, channel: int) -> str:
    return f"max_{layer.replace('.', '_')}_{channel}.png"


def start_maximize(c: Client, pool: Executor, out: Path, p: Profile) -> Callable[[], str]:
    """Send every optimisation; the returned function waits for them and renders the section."""
    def send(target: int | Unit, preset: str) -> Future[MaximizeResult]:
        return pool.submit(c.maximize_unit, MODEL, target, preset=preset, steps=p.maximize_steps,
                           size=p.maximize_size, seed=0, timeout=3600)

    calls = {f"max_{preset}_{index}.png": send(index, preset) for index in p.classes for preset in p.presets}
    calls.update({_channel_file(layer, ch): send(Unit(layer, ch), "lucid")
                  for layer, channels in p.channels for ch in channels})

    def render() -> str:
        results = {name: f.result() for name, f in calls.items()}
        rows = []
        for index in p.classes:
            cells = []
            for preset in p.presets:
                name = f"max_{preset}_{index}.png"
                r = results[name]
                top = r.predictions[0]
                cells.append(figure(out, name, r.image, f"{preset}: logit {r.objective:.1f}; top-1 {top.label} "
                                                        f"{top.probability:.0%}", 192))
            rows.append(f"<div class='row'><b>{index} {html.escape(CLASSES[index])}</b>{''.join(cells)}</div>")
        units = [figure(out, _channel_file(layer, ch), results[_channel_file(layer, ch)].image,
                        f"{layer} channel {ch} (mean)", 192) for layer, channels in p.channels for ch in channels]
        presets = "; ".join(f"<code>{x}</code>: {PRESET_NOTES.get(x, '')}" for x in p.presets)
        return (f"<h2>MaximizeUnit: images that excite a class or a channel</h2><p>{len(calls)} optimisations "
                f"of {p.maximize_steps} steps at {p.maximize_size} px, sent at once: the server stepped them "
                f"together. Presets: {presets}.</p>{''.join(rows)}<h3>Channels</h3>"
                f"<div class='row'>{''.join(units)}</div>")

    return render
