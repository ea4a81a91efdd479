"""MaximizeUnit quality on EfficientNet-Lite0, judged by Lite0 itself and by a second network (Lite2).

For each preset, every class is one job, and all jobs that share a key run in one step batch (the step
scheduler's batching, in process). Writes docs/img/maximize_<preset>_<class>.png and a JSON summary.

    OMP_NUM_THREADS=2 .venv/bin/python -m tools.quality.maximize --steps 192 --presets lucid,lecture,maco
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from convlens.server.engine.optimize.maximize import MaximizeJob, MaximizeSettings, evaluate
from convlens.server.engine.optimize.objectives import ClassLogit
from convlens.server.engine.optimize.runner import run_step
from convlens.server.engine.predictions import top_k
from convlens.server.models.embedded import load_lite
from tools.common import MODEL

# The lecture's classes, plus goldfish and espresso.
CLASSES = {130: "flamingo", 144: "pelican", 351: "hartebeest", 736: "pool table", 302: "ground beetle",
           63: "Indian cobra", 436: "beach wagon", 100: "black swan", 1: "goldfish", 967: "espresso"}


def judge(model, image: torch.Tensor) -> torch.Tensor:
    """Logits of `model` on a [3, H, W] 0..1 image resized to its input size."""
    pre = model.preprocess
    x = F.interpolate(image[None], size=(pre.height, pre.width), mode="bilinear", align_corners=False,
                      antialias=True)
    mean = torch.tensor(pre.mean).view(1, 3, 1, 1)
    std = torch.tensor(pre.std).view(1, 3, 1, 1)
    with torch.no_grad():
        return model.module((x - mean) / std)[0]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=192)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--presets", default="lucid,lecture,maco")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("docs/img"))
    p.add_argument("--json", type=Path, default=Path("docs/img/maximize_quality.json"))
    p.add_argument("--tag", default="", help="appended to the preset in file names, e.g. _320")
    p.add_argument("--set", action="append", default=[], metavar="KNOB=VALUE",
                   help="override a preset knob for every job, e.g. --set learning_rate=0.05 (repeatable)")
    args = p.parse_args()
    overrides = {k: float(v) if "." in v or "e" in v else int(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    lite0 = load_lite(MODEL).replica(cpu, memory_format=torch.channels_last)
    lite2 = load_lite("efficientnet_lite2")
    pre = lite0.preprocess
    jobs: dict[tuple[str, int], MaximizeJob] = {}
    for preset in args.presets.split(","):
        for c in CLASSES:
            s = MaximizeSettings.resolve(preset, steps=args.steps, size=args.size, seed=args.seed, **overrides)
            jobs[(preset, c)] = MaximizeJob(s, ClassLogit(c), mean=pre.mean, std=pre.std, device=cpu)
    start = time.monotonic()
    batches = 0
    while not all(j.done for j in jobs.values()):
        groups: dict[object, list[MaximizeJob]] = {}
        for j in jobs.values():
            if not j.done:
                groups.setdefault(j.key, []).append(j)
        for group in groups.values():
            run_step(lite0.module, group)
            batches += 1
        step = max(j.step for j in jobs.values())
        if step % 8 == 0:
            print(f"step {step}/{args.steps}  {time.monotonic() - start:.0f}s", flush=True)
    elapsed = time.monotonic() - start
    rows = []
    for (preset, c), job in jobs.items():
        (ev,) = evaluate(lite0.module, [job])
        image = job.image()
        other = judge(lite2, image)
        Image.fromarray(job.image_uint8()).save(args.out / f"maximize_{preset}{args.tag}_{c}.png")
        t0 = [q.class_index for q in top_k(ev.logits, lite0.labels, 5)]
        t2 = top_k(other, lite2.labels, 5)
        rows.append({"preset": preset, "class": c, "name": CLASSES[c], "logit": ev.objective,
                     "lite0_top1": t0[0] == c, "lite0_top5": c in t0,
                     "lite0_p": float(torch.softmax(ev.logits, 0)[c]),
                     "lite2_top1": t2[0].class_index == c, "lite2_top5": c in [q.class_index for q in t2],
                     "lite2_p": float(torch.softmax(other, 0)[c]), "lite2_says": t2[0].label})
        r = rows[-1]
        print(f"{preset:8s} {c:4d} {CLASSES[c]:14s} logit {r['logit']:6.1f}  lite0 top1 {r['lite0_top1']!s:5} "
              f"p={r['lite0_p']:.2f}  lite2 top1 {r['lite2_top1']!s:5} top5 {r['lite2_top5']!s:5} "
              f"p={r['lite2_p']:.2f} ({r['lite2_says']})", flush=True)
    summary = {"steps": args.steps, "size": args.size, "seed": args.seed, "overrides": overrides, "seconds": elapsed,
               "step_batches": batches, "torch_threads": torch.get_num_threads(), "rows": rows}
    args.json.write_text(json.dumps(summary, indent=1))
    for preset in args.presets.split(","):
        mine = [r for r in rows if r["preset"] == preset]
        print(preset, {k: sum(r[k] for r in mine) for k in ("lite0_top1", "lite2_top1", "lite2_top5")})
    print(f"{elapsed:.0f}s")


if __name__ == "__main__":
    # On a thread of its own, as the server's worker runs steps: on this oversubscribed 2-core machine torch
    # ran the same step 15-30x slower on the main thread (see tools/bench/maximize.py).
    import threading

    worker = threading.Thread(target=main)
    worker.start()
    worker.join()
