"""The demo's Dream and StyleTransfer sections: dreams at an early and the default late layer, a guided dream
(gallery), style transfers of content x style pairs, and softening off and on side by side (gallery). The
calls are sent at once, beside the other optimisations, so the server batches their steps as it would for
many callers."""

from __future__ import annotations

import html
from collections.abc import Callable
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import Any

from PIL import Image

from convlens.client import Client
from tools.common import MODEL, figure, photo
from tools.demo.profile import Profile


def _photo(out: Path, name: str, height: int) -> str:
    """The input photo `name` as a figure beside a result."""
    return figure(out, f"photo_{name}.png", Image.fromarray(photo(name)), name, height)


def start_dream(c: Client, pool: Executor, out: Path, p: Profile) -> Callable[[], str]:
    """Send the dreams; the returned function waits for them and renders the section."""
    calls: dict[str, Future[Any]] = {}
    options: dict[str, Any] = {"max_size": p.dream_size}
    if p.dream_steps is not None:
        options["steps_per_octave"] = p.dream_steps
    for name, layer in p.dreams:
        calls[f"dream_{name}_{layer or 'default'}"] = pool.submit(c.dream, photo(name), MODEL, layer, timeout=3600,
                                                                  **options)
    if p.guided_dream:
        calls["dream_guided"] = pool.submit(c.dream, photo("chelsea"), MODEL, guide=photo("flower"), timeout=3600,
                                            **options)

    def render() -> str:
        results = {k: f.result() for k, f in calls.items()}
        dreams = []
        for name, layer in p.dreams:
            key = f"dream_{name}_{layer or 'default'}"
            r = results[key]
            gain = r.objective / r.input_objective if r.input_objective else float("nan")
            dreams.append(_photo(out, name, 192) + figure(out, f"{key}.png", r.image,
                                                          f"dreamt at {r.settings['layer']}: objective x{gain:.1f}"))
        if p.guided_dream:
            g = results["dream_guided"]
            dreams.append(_photo(out, "flower", 192))
            dreams.append(figure(out, "dream_guided.png", g.image,
                                 f"chelsea guided by the flower, {g.settings['layer']}"))
        first = next(iter(results.values()))
        return ("<h2>DeepDream</h2><p>google/deepdream's method ("
                f"{first.settings.get('octaves')} octaves, {first.settings.get('steps_per_octave')} steps each "
                f"(the model's default), normalised gradient steps, jitter) at most {p.dream_size} px. Objective "
                "gain measured by a plain forward pass on the result.</p>" + "".join(dreams))

    return render


def start_style(c: Client, pool: Executor, out: Path, p: Profile) -> Callable[[], str]:
    """Send the style transfers; the returned function waits for them and renders the section."""
    calls: dict[str, Future[Any]] = {}
    for content, style in p.styles:
        calls[f"style_{content}_{style}"] = pool.submit(c.style_transfer, photo(content), photo(style), MODEL,
                                                        size=p.style_size, steps=p.style_steps, timeout=3600)
    softens = ("none", "channels") if p.soften_pair else ()
    for soften in softens:
        calls[f"soften_{soften}"] = pool.submit(c.style_transfer, photo("chelsea"), photo("brick"), MODEL,
                                                size=p.style_size, steps=p.style_steps, soften=soften,
                                                timeout=3600)

    def render() -> str:
        results = {k: f.result() for k, f in calls.items()}
        styles = []
        for content, style in p.styles:
            key = f"style_{content}_{style}"
            r = results[key]
            drop = 1 - r.style_loss / r.initial_style_loss if r.initial_style_loss else float("nan")
            styles.append(_photo(out, content, 128) + _photo(out, style, 128)
                          + figure(out, f"{key}.png", r.image, f"{content} in {style}'s style "
                                   f"(style loss -{drop:.0%})", 256))
        soft = [figure(out, f"soften_{s}.png", results[f"soften_{s}"].image, f"soften = {s}") for s in softens]
        settings = results[f"style_{p.styles[0][0]}_{p.styles[0][1]}"].settings or {}
        return ("<h2>Style transfer</h2><p>Gatys et al. with the model's defaults "
                f"(style layers {html.escape(', '.join(settings.get('style_layers', [])))}, content "
                f"{html.escape(str(settings.get('content_layer')))}, soften {settings.get('soften')}, "
                f"{settings.get('optimizer')}), {p.style_steps} steps at {p.style_size} px.</p>" + "".join(styles)
                + ("<h3>Softening (Wang et al., CVPR 2021) off and on</h3>" + "".join(soft) if soft else ""))

    return render
