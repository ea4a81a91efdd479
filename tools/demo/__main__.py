"""`make demo`: start a server on the embedded default, call every RPC through the SDK, write out/demo/index.html.

`--gallery` (`make gallery`, out/gallery/) computes the full gallery: every MaximizeUnit preset and class,
more dreams, styles and units (tools/demo/profile.py). The optimisations are sent first, all at once, so the
server batches their steps while the quick sections (catalog, filters, saliency, units) run; each section
prints a progress line when it is written."""

from __future__ import annotations

import argparse
import html
import resource
import time
from collections.abc import Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from convlens.client import Client, LayerInfo
from convlens.server.launcher import ServerProcess
from tools.common import MODEL, load_average, photo
from tools.demo.dream_style import start_dream, start_style
from tools.demo.maximize import start_maximize
from tools.demo.profile import GALLERY, QUICK, Profile
from tools.demo.units import start_units

DEEPER_LAYERS = ("_blocks.0._depthwise_conv", "_blocks.1._expand_conv", "_blocks.5._depthwise_conv")
SALIENCY_METHODS = ("gradient", "guided_backprop", "smoothgrad", "integrated_gradients", "grad_cam",
                    "guided_grad_cam")


def attribution_picture(attribution: np.ndarray) -> Image.Image:
    """Signed [C, H, W] attribution as an RGB image, grey = 0 (how the guided-backprop papers show it)."""
    a = attribution if attribution.shape[0] == 3 else np.repeat(attribution[:1], 3, axis=0)
    peak = float(np.percentile(np.abs(a), 99.5)) or 1.0
    rgb = np.clip(0.5 + 0.5 * a / peak, 0, 1).transpose(1, 2, 0)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def catalog_section(c: Client) -> str:
    models = c.list_models()
    details = c.get_model(MODEL)
    items = "".join(
        f"<li>{html.escape(m.name)} ({m.format}, {m.input_size[0]}x{m.input_size[1]}, {m.num_classes} classes, "
        f"{m.parameter_count:,} parameters)</li>" for m in models)

    def rf(layer: LayerInfo) -> str:
        f = layer.receptive_field
        return "-" if f is None else f"{f.size[0]} / {f.jump[0]}"

    rows = "".join(
        f"<tr><td>{html.escape(layer.name)}</td><td>{layer.type}</td>"
        f"<td>{'x'.join(map(str, layer.output_shape))}</td><td>{layer.parameter_count:,}</td>"
        f"<td>{rf(layer)}</td></tr>"
        for layer in details.layers)
    return (f"<h2>Models served</h2><ul>{items}</ul>"
            f"<h2>Layers of {MODEL}</h2><details><summary>{len(details.layers)} named modules "
            "(click)</summary><table><tr><th>name</th><th>type</th><th>output</th><th>params</th>"
            f"<th>receptive field size / jump (px)</th></tr>{rows}</table></details>")


def filters_section(c: Client, out: Path) -> str:
    stem = c.get_filters(MODEL, "_conv_stem", grid=True, cell_scale=12)
    assert stem.grid is not None
    stem.grid.save(out / "filters_stem.png")
    deeper = []
    for layer in DEEPER_LAYERS:
        f = c.get_filters(MODEL, layer, grid=True, max_filters=32, max_input_channels=16)
        assert f.grid is not None
        name = f"filters_{layer.replace('.', '_')}.png"
        f.grid.save(out / name)
        deeper.append(f"<figure><img src='{name}' class='px'><figcaption>{layer}: {list(f.weights.shape)}, "
                      f"groups {f.groups}, dead {len(f.dead_channels)}</figcaption></figure>")
    return (f"<h2>First-layer filters</h2><p>_conv_stem: {stem.weights.shape[0]} filters of "
            f"{stem.weights.shape[2]}x{stem.weights.shape[3]} RGB, per-filter min-max scaled. "
            f"Dead channels (BatchNorm running_var = 0, framed in red): {stem.dead_channels}.</p>"
            "<img src='filters_stem.png' class='px'>"
            "<h2>Deeper filters</h2><p>One grey tile per input channel (rows: filters), or one "
            "per filter for depthwise convolutions.</p>" + "".join(deeper))


def saliency_section(c: Client, pool: Executor, out: Path, p: Profile) -> str:
    """Every method at once (each its own request; the batcher groups what it can)."""
    cat = photo("chelsea")
    Image.fromarray(cat).save(out / "chelsea.png")
    options: dict[str, dict[str, Any]] = {"smoothgrad": {"samples": p.smoothgrad_samples, "noise_level": 0.15},
                                          "integrated_gradients": {"steps": p.ig_steps}}
    calls = {m: pool.submit(c.saliency, cat, MODEL, method=m, overlay=True, **options.get(m, {}))
             for m in SALIENCY_METHODS}
    figures = ["<figure><img src='chelsea.png' height=224><figcaption>input</figcaption></figure>"]
    top = None
    for method, future in calls.items():
        s = future.result()
        top = s.predictions
        assert s.overlay is not None
        s.overlay.save(out / f"saliency_{method}.png")
        attribution_picture(s.attribution).save(out / f"attribution_{method}.png")
        extra = f", {s.modified_activations} ReLU6 modified" if s.modified_activations else ""
        detail = ", ".join(f"{k} {v}" for k, v in options.get(method, {}).items())
        figures.append(
            f"<figure><img src='saliency_{method}.png'><img src='attribution_{method}.png'>"
            f"<figcaption>{method}{f' ({detail})' if detail else ''}{extra}</figcaption></figure>")
    preds = ", ".join(f"{q.label} {q.probability:.2f}" for q in (top or []))
    return (f"<h2>Saliency: which pixels decide the top-1 class</h2><p>Predictions: {preds}. "
            "Each pair: heatmap overlay, then the signed attribution (grey = 0).</p>" + "".join(figures))


def write_page(c: Client, profile: Profile, out: Path, started: float | None = None) -> Path:
    """Call every RPC through `c` as `profile` says, write the pictures and out/index.html; a progress line
    per section. `started`: the clock the progress lines count from (default: now)."""
    started = time.perf_counter() if started is None else started
    names = ("catalog", "filters", "saliency", "units", "dream", "style transfer", "maximize unit")
    done = 0

    def progress(section: str, detail: str = "") -> None:
        nonlocal done
        done += 1
        print(f"[{done}/{len(names)}] {section:14s} written at {time.perf_counter() - started:5.1f} s"
              f"{'  ' + detail if detail else ''}", flush=True)

    with ThreadPoolExecutor(max_workers=64) as pool:
        info = c.get_model(MODEL).info
        # The optimisations first, all at once: they take longest, and the server steps them together.
        pending = {"maximize unit": start_maximize(c, pool, out, profile),
                   "style transfer": start_style(c, pool, out, profile),
                   "dream": start_dream(c, pool, out, profile),
                   "units": start_units(c, pool, out, profile)}
        sections = [catalog_section(c)]
        progress("catalog", "ListModels, GetModel")
        sections.append(filters_section(c, out))
        progress("filters", f"GetFilters on {1 + len(DEEPER_LAYERS)} layers")
        sections.append(saliency_section(c, pool, out, profile))
        progress("saliency", f"{len(SALIENCY_METHODS)} methods")
        for name in ("units", "dream", "style transfer", "maximize unit"):
            sections.append(pending[name]())
            progress(name)

    page = f"""<!doctype html><meta charset=utf-8><title>ConvLens {profile.name}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto}}
figure{{display:inline-block;margin:.5em;vertical-align:top}} img.px{{image-rendering:pixelated}}
table{{border-collapse:collapse;font-size:12px}} td,th{{border:1px solid #ccc;padding:2px 6px}}</style>
<h1>ConvLens on {MODEL}</h1><p>{info.parameter_count:,} parameters, input {info.input_size[0]}x{info.input_size[1]}.
Generated by <code>make {profile.name}</code> through the Python SDK against a live server in
{time.perf_counter() - started:.0f} s.</p>
{''.join(sections)}"""
    (out / "index.html").write_text(page)
    return out / "index.html"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="default out/demo (out/gallery with --gallery)")
    parser.add_argument("--gallery", action="store_true", help="the full gallery: every preset and class")
    args = parser.parse_args(argv)
    profile = GALLERY if args.gallery else QUICK
    out: Path = args.out or Path("out") / profile.name
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with ServerProcess(["--device", "cpu"], log_path=out / "server.log") as server, Client(server.address) as c:
        print(f"server up on {server.address} in {time.perf_counter() - started:.1f} s ({profile.name} profile)",
              flush=True)
        page = write_page(c, profile, out, started)
    me, server_cpu = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (me.ru_utime + me.ru_stime, server_cpu.ru_utime + server_cpu.ru_stime)
    print(f"wrote {page} in {time.perf_counter() - started:.1f} s; CPU seconds: demo {cpu[0]:.0f}, "
          f"server {cpu[1]:.0f} (load average now {load_average()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
