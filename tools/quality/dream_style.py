"""Quality measurements for Dream and StyleTransfer on EfficientNet-Lite0 (docs/quality.md).

    .venv/bin/python -m tools.quality.dream_style dream-layers     # a contact sheet to pick the layer by eye
    .venv/bin/python -m tools.quality.dream_style dream            # defaults: objective gain on photos
    .venv/bin/python -m tools.quality.dream_style style-sweep      # softening x style weight, by the numbers
    .venv/bin/python -m tools.quality.dream_style style            # defaults on content x style pairs
    .venv/bin/python -m tools.quality.dream_style adam-lbfgs       # equal wall time

Jobs of one size and layer set run batched through the optimisation core's step runner (one forward and
backward per step for all), as the server runs them. Pictures go to docs/img/; numbers are printed as
Markdown table rows. Judged also by EfficientNet-Lite2 (Gram distances at its layers), a second network.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from convlens.server.engine.layer_features import PixelSpace, layer_features
from convlens.server.engine.optimize import dream as D
from convlens.server.engine.optimize import style as S
from convlens.server.engine.optimize.runner import run_step
from convlens.server.models.embedded import load_lite
from convlens.server.service.dream import DEFAULT_LAYERS, DEFAULT_STEPS_PER_OCTAVE
from convlens.server.service.style import DEFAULTS
from tools import common
from tools.common import MODEL, sheet

IMG = Path("docs/img")
JUDGE_LAYERS = ("_act0", "_blocks.3", "_blocks.6", "_blocks.10", "_blocks.14")  # Lite2: last block per stride


def photo(name: str) -> torch.Tensor:
    """An embedded photo as [3, H, W] float 0..255 (grey ones repeated to RGB)."""
    return torch.from_numpy(common.photo(name).astype(np.float32)).permute(2, 0, 1)


def to_pil(pixels: torch.Tensor) -> Image.Image:
    array = pixels.detach().clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(array))


def run_batched(model: torch.nn.Module, jobs: list) -> float:
    """Step every job to the end, batching those whose keys agree; returns the wall time."""
    start = time.perf_counter()
    while any(not j.done for j in jobs):
        groups: dict[object, list] = {}
        for j in jobs:
            if not j.done:
                groups.setdefault(j.key, []).append(j)
        for group in groups.values():
            run_step(model, group)
    return time.perf_counter() - start


# ---------------------------------------------------------------- dream


def dream_jobs(model, space, images, settings_list, objectives=None):
    jobs = []
    for k, (image, settings) in enumerate(zip(images, settings_list, strict=True)):
        objective = objectives[k] if objectives else D.l2_objective(settings.channel)
        jobs.append(D.DreamJob(image, settings, objective, mean=space.mean, std=space.std))
    return jobs


def gain(model, space, job: D.DreamJob) -> tuple[float, float]:
    out = job.picture()
    before = D.resize(job.bases[-1], (int(out.shape[-2]), int(out.shape[-1])))
    return (D.layer_objective(model, space, before, job.settings.layer, job.objective),
            D.layer_objective(model, space, out, job.settings.layer, job.objective))


def dream_layers(args: argparse.Namespace) -> None:
    served = load_lite(MODEL)
    model, space = served.module, PixelSpace(served.preprocess.mean, served.preprocess.std)
    layers = args.layers.split(",")
    rows = []
    for name in args.photos.split(","):
        image = photo(name)
        jobs = dream_jobs(model, space, [image] * len(layers),
                          [D.DreamSettings(layer=layer, max_size=args.size, steps_per_octave=args.steps_per_octave)
                           for layer in layers])
        wall = run_batched(model, jobs)
        row = [(f"{name} input", to_pil(D.resize(image, D.fit_size(*image.shape[-2:], args.size))))]
        for job in jobs:
            before, after = gain(model, space, job)
            print(f"| {name} | `{job.settings.layer}` | {before:.3g} | {after:.3g} | {after / before:.1f}x |")
            row.append((f"{job.settings.layer} x{after / before:.1f}", to_pil(job.picture())))
        rows.append(row)
        print(f"({name}: {wall:.0f} s)")
    sheet(rows, cell=args.cell).save(IMG / f"dream_layers{args.tag}.jpg", quality=85)


def dream_default(args: argparse.Namespace) -> None:
    served = load_lite(MODEL)
    model, space = served.module, PixelSpace(served.preprocess.mean, served.preprocess.std)
    layer, steps = DEFAULT_LAYERS[MODEL], DEFAULT_STEPS_PER_OCTAVE[MODEL]
    names = ["chelsea", "coffee", "astronaut", "china"]
    images = [photo(n) for n in names]
    jobs = dream_jobs(model, space, images, [D.DreamSettings(layer=layer, seed=i, steps_per_octave=steps)
                                             for i in range(len(names))])
    guide = photo("flower")
    feats = D.guide_features(model, space, guide, layer, max(D.fit_size(*images[0].shape[-2:], 512)))
    guided = dream_jobs(model, space, [images[0]], [D.DreamSettings(layer=layer, steps_per_octave=steps)],
                        [D.guide_objective(feats)])
    wall = run_batched(model, jobs + guided)
    rows, row = [], []
    for name, job in zip([*names, "chelsea guided by flower"], jobs + guided, strict=True):
        before, after = gain(model, space, job)
        s = job.settings
        print(f"| {name} | {tuple(job.picture().shape[-2:])} | {s.octaves} | {before:.3g} | {after:.3g} | "
              f"{after / before:.1f}x |")
        row.append((f"{name} x{after / before:.1f}", to_pil(job.picture())))
    rows.append([(n, to_pil(i)) for n, i in zip(names, images, strict=True)] + [("guide: flower", to_pil(guide))])
    rows.append(row)
    print(f"({wall:.0f} s for {len(jobs) + 1} dreams)")
    sheet(rows, cell=args.cell).save(IMG / "dream_default.jpg", quality=85)


# ---------------------------------------------------------------- style


class Judge:
    """Gram distances at EfficientNet-Lite2's layers, and Lite0 content-feature cosine."""

    def __init__(self) -> None:
        lite2 = load_lite("efficientnet_lite2")
        self.model, self.space = lite2.module, PixelSpace(lite2.preprocess.mean, lite2.preprocess.std)

    @torch.no_grad()
    def grams(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = layer_features(self.model, image[None], JUDGE_LAYERS, self.space)
        return {k: S.gram(v[0]) for k, v in feats.items()}

    def distance(self, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
                 layers: Sequence[str] = JUDGE_LAYERS) -> float:
        """Sum over layers of ||G_a - G_b||^2 / ||G_b||^2 (each layer counts alike)."""
        return float(sum(((a[k] - b[k]).pow(2).sum() / b[k].pow(2).sum()) for k in layers))


@torch.no_grad()
def content_cosine(model, space, layer: str, a: torch.Tensor, b: torch.Tensor) -> float:
    fa = layer_features(model, a[None], [layer], space)[layer].flatten()
    fb = layer_features(model, b[None], [layer], space)[layer].flatten()
    return float(torch.nn.functional.cosine_similarity(fa, fb, dim=0))


def evaluate(model, space, judge: Judge, job: S.StyleJob, content: torch.Tensor, style: torch.Tensor,
             initial: float) -> dict[str, float]:
    out = job.picture()
    gs, go, gc = judge.grams(style), judge.grams(out), judge.grams(content)
    ratio = judge.distance(go, gs) / judge.distance(gc, gs)
    per_layer = " ".join(f"{judge.distance(go, gs, (k,)) / judge.distance(gc, gs, (k,)):.2f}" for k in JUDGE_LAYERS)
    return {"style_drop": 1 - job.losses["style"] / initial,
            "cosine": content_cosine(model, space, job.settings.content_layer, out, content),
            "lite2_ratio": ratio, "per_layer": per_layer}


def style_jobs(model, space, pairs, settings_list):
    jobs, prepared = [], []
    for (content, style), settings in zip(pairs, settings_list, strict=True):
        c, s = S.prepare_images(content, style, settings.size)
        targets = S.make_targets(model, space, c, s, settings)
        jobs.append(S.StyleJob(settings, targets, S.start_image(c, settings), mean=space.mean, std=space.std))
        prepared.append((c, s))
    return jobs, prepared


def run_style(model, space, jobs) -> tuple[list[float], float]:
    """Run to the end; the style loss at the first step of each job, and the wall time."""
    initial: list[float] = [float("nan")] * len(jobs)
    start = time.perf_counter()
    while any(not j.done for j in jobs):
        groups: dict[object, list[int]] = {}
        for i, j in enumerate(jobs):
            if not j.done:
                groups.setdefault(j.key, []).append(i)
        for idx in groups.values():
            reports = run_step(model, [jobs[i] for i in idx])
            for i, r in zip(idx, reports, strict=True):
                if r.step == 1:
                    initial[i] = r.terms["style"]
    return initial, time.perf_counter() - start


def lite0():
    served = load_lite(MODEL)
    return served.module, PixelSpace(served.preprocess.mean, served.preprocess.std)


def base_settings(**kw) -> S.StyleSettings:
    d = DEFAULTS[MODEL]
    base = S.StyleSettings(style_layers=d.style_layers, content_layer=d.content_layer, style_weight=d.style_weight,
                           soften=d.soften, temperature=d.temperature, learning_rate=d.learning_rate,
                           style_distance=d.style_distance)
    return dataclasses.replace(base, **kw)


def style_sweep(args: argparse.Namespace) -> None:
    model, space = lite0()
    judge = Judge()
    content, style = photo("chelsea"), photo(args.style)
    variants = [dict(soften=s, style_weight=w, temperature=t) for s, t in json.loads(args.softens)
                for w in json.loads(args.weights)]
    if args.variants:
        variants = [{"soften": "none", "temperature": 1.0, "style_weight": 1.0, **v} for v in json.loads(args.variants)]
        for v in variants:
            if "style_layers" in v:
                v["style_layers"] = tuple(v["style_layers"])
    settings = [base_settings(size=args.size, steps=args.steps, **v) for v in variants]
    jobs, prepared = style_jobs(model, space, [(content, style)] * len(settings), settings)
    initial, wall = run_style(model, space, jobs)
    row = []
    for v, job, (c, s), init in zip(variants, jobs, prepared, initial, strict=True):
        m = evaluate(model, space, judge, job, c, s, init)
        extra = {k: x for k, x in v.items() if k not in ("soften", "temperature", "style_weight")}
        print(f"| {v['soften']} | {v['temperature']:g} | {v['style_weight']:g} | {m['style_drop']:.1%} | "
              f"{m['cosine']:.2f} | {m['lite2_ratio']:.2f} | {extra or ''} | {m['per_layer']} |")
        row.append((f"{v['soften']} T{v['temperature']:g} w{v['style_weight']:g} r{m['lite2_ratio']:.2f}",
                    to_pil(job.picture())))
    print(f"({wall:.0f} s for {len(jobs)} jobs batched)")
    per_row = args.per_row
    sheet([row[i:i + per_row] for i in range(0, len(row), per_row)], cell=args.cell).save(
        IMG / f"style_sweep_{args.style}{args.tag}.jpg", quality=85)


def style_default(args: argparse.Namespace) -> None:
    model, space = lite0()
    judge = Judge()
    pairs = [tuple(p.split(":")) for p in args.pairs.split(",")]
    images = [(photo(c), photo(s)) for c, s in pairs]
    overrides = json.loads(args.overrides)
    settings = [base_settings(size=args.size, steps=args.steps, **overrides) for _ in pairs]
    jobs, prepared = style_jobs(model, space, images, settings)
    initial, wall = run_style(model, space, jobs)
    rows = []
    for (cn, sn), job, (c, s), init in zip(pairs, jobs, prepared, initial, strict=True):
        m = evaluate(model, space, judge, job, c, s, init)
        print(f"| {cn} | {sn} | {m['style_drop']:.1%} | {m['cosine']:.2f} | {m['lite2_ratio']:.2f} |")
        rows.append([(cn, to_pil(c)), (sn, to_pil(s)), (f"x{m['lite2_ratio']:.2f} cos {m['cosine']:.2f}",
                                                        to_pil(job.picture()))])
    print(f"({wall:.0f} s for {len(jobs)} jobs batched; settings {settings[0]})")
    sheet(rows, cell=args.cell).save(IMG / f"style_default{args.tag}.jpg", quality=85)


def adam_lbfgs(args: argparse.Namespace) -> None:
    model, space = lite0()
    judge = Judge()
    content, style = photo("chelsea"), photo(args.style)
    adam_settings = base_settings(size=args.size, steps=args.steps)
    (adam,), (prep,) = style_jobs(model, space, [(content, style)], [adam_settings])
    initial, wall = run_style(model, space, [adam])
    m = evaluate(model, space, judge, adam, *prep, initial[0])
    print(f"| Adam | {adam.step} | {wall:.0f} s | {adam.losses['style']:.4g} | {m['style_drop']:.1%} | "
          f"{m['cosine']:.2f} | {m['lite2_ratio']:.2f} |")
    (lb,), _ = style_jobs(model, space, [(content, style)], [dataclasses.replace(adam_settings, optimizer="lbfgs",
                                                                                steps=10_000)])
    start, first = time.perf_counter(), float("nan")
    while time.perf_counter() - start < wall:
        r = run_step(model, [lb])[0]
        if r.step == 1:
            first = r.terms["style"]
    lwall = time.perf_counter() - start
    ml = evaluate(model, space, judge, lb, *prep, first)
    print(f"| L-BFGS | {lb.step} | {lwall:.0f} s | {lb.losses['style']:.4g} | {ml['style_drop']:.1%} | "
          f"{ml['cosine']:.2f} | {ml['lite2_ratio']:.2f} |")
    sheet([[("Adam", to_pil(adam.picture())), ("L-BFGS, same wall time", to_pil(lb.picture()))]],
          cell=args.cell).save(IMG / "style_adam_lbfgs.jpg", quality=85)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["dream-layers", "dream", "style-sweep", "style", "adam-lbfgs"])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--cell", type=int, default=224)
    p.add_argument("--style", default="brick")
    p.add_argument("--softens", default='[["none", 1], ["channels", 1], ["positions", 1], ["all", 1]]')
    p.add_argument("--weights", default="[1e3, 1e4, 1e5]")
    p.add_argument("--pairs", default="chelsea:brick,coffee:gravel,astronaut:grass,china:flower")
    p.add_argument("--overrides", default="{}")
    p.add_argument("--variants", default="", help="JSON list of setting overrides, instead of softens x weights")
    p.add_argument("--layers", default="_blocks.2,_blocks.4,_blocks.5,_blocks.7,_blocks.8,_blocks.10,_blocks.12")
    p.add_argument("--photos", default="chelsea,coffee")
    p.add_argument("--steps-per-octave", type=int, default=10)
    p.add_argument("--per-row", type=int, default=3)
    p.add_argument("--tag", default="")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    IMG.mkdir(parents=True, exist_ok=True)
    {"dream-layers": dream_layers, "dream": dream_default, "style-sweep": style_sweep, "style": style_default,
     "adam-lbfgs": adam_lbfgs}[args.what](args)


if __name__ == "__main__":
    main()
