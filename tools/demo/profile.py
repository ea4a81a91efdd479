"""How much the demo computes: `QUICK` for `make demo` (a first look in under 3 minutes on 2 CPU cores) and
`GALLERY` for `make gallery` (every MaximizeUnit preset and class, more dreams and styles).

The quick profile keeps one example of every technique at settings that still give a recognisable picture
(docs/quality.md): fewer variants, smaller optimised images, every optimisation sent at once so that the
server's step scheduler batches their steps."""

from __future__ import annotations

from dataclasses import dataclass

# The lecture's classes, plus goldfish and espresso.
CLASSES = {130: "flamingo", 144: "pelican", 351: "hartebeest", 736: "pool table", 302: "ground beetle",
           63: "Indian cobra", 436: "beach wagon", 100: "black swan", 1: "goldfish", 967: "espresso"}
PRESETS = ("lucid", "maco", "lecture")  # every MaximizeUnit preset

Units = tuple[tuple[str, str, tuple[int, ...]], ...]  # (layer, what it is, channels)


@dataclass(frozen=True)
class Profile:
    name: str
    smoothgrad_samples: int
    ig_steps: int
    units: Units
    dreams: tuple[tuple[str, str | None], ...]  # (photo, layer; None: the server's default dream layer)
    guided_dream: bool
    dream_size: int
    styles: tuple[tuple[str, str], ...]  # (content photo, style photo)
    style_size: int
    style_steps: int
    soften_pair: bool  # chelsea x brick with softening off and on, side by side
    classes: tuple[int, ...]
    presets: tuple[str, ...]
    channels: tuple[tuple[str, tuple[int, ...]], ...]  # (block, channels) visualised with `lucid`
    maximize_steps: int
    maximize_size: int
    dream_steps: int | None = None  # steps per octave; None: the model's default


GALLERY = Profile(
    name="gallery",
    smoothgrad_samples=16, ig_steps=32,
    units=(("_blocks.2", "early block (receptive field 19 px)", (3, 7, 11, 19)),
           ("_blocks.7", "middle block (147 px)", (5, 21, 40, 66)),
           ("_blocks.14", "late block (787 px: most of the photo)", (8, 30, 77, 150)),
           ("_fc", "logits: classes", (967, 285, 417, 812))),
    dreams=tuple((p, layer) for p in ("chelsea", "coffee", "astronaut") for layer in ("_blocks.3", None)),
    guided_dream=True, dream_size=256,
    styles=(("chelsea", "brick"), ("coffee", "gravel"), ("astronaut", "grass"), ("china", "flower")),
    style_size=224, style_steps=200, soften_pair=True,
    classes=tuple(CLASSES), presets=PRESETS,
    channels=(("_blocks.2", (3, 7)), ("_blocks.8", (5, 20)), ("_blocks.14", (11, 40))),
    maximize_steps=128, maximize_size=224,
)

QUICK = Profile(
    name="demo",
    smoothgrad_samples=8, ig_steps=16,
    units=(("_blocks.2", "early block (receptive field 19 px)", (3, 11, 19)),
           ("_blocks.14", "late block (787 px: most of the photo)", (8, 30, 150))),
    dreams=(("chelsea", None),), guided_dream=False, dream_size=224,
    styles=(("chelsea", "brick"),), style_size=224, style_steps=150, soften_pair=False,
    # The classes lucid draws most recognisably at 128 steps (docs/img/maximize_lucid_*.png).
    classes=(144, 351, 967), presets=("lucid",),
    channels=(("_blocks.8", (20,)),),
    maximize_steps=128, maximize_size=224,
)
