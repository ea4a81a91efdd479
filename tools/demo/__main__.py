"""`make demo`: start a server on the embedded default, call it through the SDK, write out/demo/index.html."""

from __future__ import annotations

import argparse
import html
import time
from pathlib import Path

import numpy as np
from PIL import Image

from convlens.client import Client, LayerInfo
from convlens.server.launcher import ServerProcess
from tools.common import MODEL, photo
from tools.demo.dream_style import dream_style_section
from tools.demo.maximize import maximize_section
from tools.demo.units import units_section

DEEPER_LAYERS = ("_blocks.0._depthwise_conv", "_blocks.1._expand_conv", "_blocks.5._depthwise_conv")
SALIENCY_METHODS = (
    ("gradient", {}),
    ("guided_backprop", {}),
    ("smoothgrad", {"samples": 16, "noise_level": 0.15}),
    ("integrated_gradients", {"steps": 32}),
    ("grad_cam", {}),
    ("guided_grad_cam", {}),
)


def attribution_picture(attribution: np.ndarray) -> Image.Image:
    """Signed [C, H, W] attribution as an RGB image, grey = 0 (how the guided-backprop papers show it)."""
    a = attribution if attribution.shape[0] == 3 else np.repeat(attribution[:1], 3, axis=0)
    peak = float(np.percentile(np.abs(a), 99.5)) or 1.0
    rgb = np.clip(0.5 + 0.5 * a / peak, 0, 1).transpose(1, 2, 0)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("out/demo"))
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    sections: list[str] = []
    started = time.perf_counter()
    with ServerProcess(["--device", "cpu"], log_path=out / "server.log") as server, Client(server.address) as c:
        print(f"server up on {server.address} in {time.perf_counter() - started:.1f} s")
        models = c.list_models()
        details = c.get_model(MODEL)
        info = details.info
        items = "".join(
            f"<li>{html.escape(m.name)} ({m.format}, {m.input_size[0]}x{m.input_size[1]}, {m.num_classes} classes, "
            f"{m.parameter_count:,} parameters)</li>" for m in models)
        sections.append(f"<h2>Models served</h2><ul>{items}</ul>")

        def rf(layer: LayerInfo) -> str:
            f = layer.receptive_field
            return "-" if f is None else f"{f.size[0]} / {f.jump[0]}"

        rows = "".join(
            f"<tr><td>{html.escape(layer.name)}</td><td>{layer.type}</td>"
            f"<td>{'x'.join(map(str, layer.output_shape))}</td><td>{layer.parameter_count:,}</td>"
            f"<td>{rf(layer)}</td></tr>"
            for layer in details.layers)
        sections.append(f"<h2>Layers of {MODEL}</h2><details><summary>{len(details.layers)} named modules "
                        "(click)</summary><table><tr><th>name</th><th>type</th><th>output</th><th>params</th>"
                        f"<th>receptive field size / jump (px)</th></tr>{rows}</table></details>")

        stem = c.get_filters(MODEL, "_conv_stem", grid=True, cell_scale=12)
        assert stem.grid is not None
        stem.grid.save(out / "filters_stem.png")
        sections.append(
            f"<h2>First-layer filters</h2><p>_conv_stem: {stem.weights.shape[0]} filters of "
            f"{stem.weights.shape[2]}x{stem.weights.shape[3]} RGB, per-filter min-max scaled. "
            f"Dead channels (BatchNorm running_var = 0, framed in red): {stem.dead_channels}.</p>"
            f"<img src='filters_stem.png' class='px'>")
        deeper = []
        for layer in DEEPER_LAYERS:
            f = c.get_filters(MODEL, layer, grid=True, max_filters=32, max_input_channels=16)
            assert f.grid is not None
            name = f"filters_{layer.replace('.', '_')}.png"
            f.grid.save(out / name)
            deeper.append(f"<figure><img src='{name}' class='px'><figcaption>{layer}: {list(f.weights.shape)}, "
                          f"groups {f.groups}, dead {len(f.dead_channels)}</figcaption></figure>")
        sections.append("<h2>Deeper filters</h2><p>One grey tile per input channel (rows: filters), or one "
                        "per filter for depthwise convolutions.</p>" + "".join(deeper))

        cat = photo("chelsea")
        Image.fromarray(cat).save(out / "chelsea.png")
        figures = ["<figure><img src='chelsea.png' height=224><figcaption>input</figcaption></figure>"]
        top = None
        for method, options in SALIENCY_METHODS:
            t0 = time.perf_counter()
            s = c.saliency(cat, MODEL, method=method, overlay=True, **options)
            took = time.perf_counter() - t0
            top = s.predictions
            assert s.overlay is not None
            s.overlay.save(out / f"saliency_{method}.png")
            attribution_picture(s.attribution).save(out / f"attribution_{method}.png")
            extra = f", {s.modified_activations} ReLU6 modified" if s.modified_activations else ""
            figures.append(
                f"<figure><img src='saliency_{method}.png'><img src='attribution_{method}.png'>"
                f"<figcaption>{method} ({took:.1f} s{extra})</figcaption></figure>")
            print(f"saliency {method}: {took:.2f} s")
        preds = ", ".join(f"{p.label} {p.probability:.2f}" for p in (top or []))
        sections.append(f"<h2>Saliency: which pixels decide the top-1 class</h2><p>Predictions: {preds}. "
                        "Each pair: heatmap overlay, then the signed attribution (grey = 0).</p>"
                        + "".join(figures))
        sections.append(units_section(c, out))
        sections.append(dream_style_section(c, out))
        sections.append(maximize_section(c, out))

    page = f"""<!doctype html><meta charset=utf-8><title>ConvLens demo</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto}}
figure{{display:inline-block;margin:.5em}} img.px{{image-rendering:pixelated}}
table{{border-collapse:collapse;font-size:12px}} td,th{{border:1px solid #ccc;padding:2px 6px}}</style>
<h1>ConvLens on {MODEL}</h1><p>{info.parameter_count:,} parameters, input {info.input_size[0]}x{info.input_size[1]}.
Generated by <code>make demo</code> through the Python SDK against a live server.</p>
{''.join(sections)}"""
    (out / "index.html").write_text(page)
    print(f"wrote {out / 'index.html'} in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
