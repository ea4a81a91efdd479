"""What an atlas covers: its options, which layers and channels, and where each page and image lives."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from .._types import LayerInfo, ModelDetails


@dataclass(frozen=True)
class AtlasOptions:
    """Everything `convlens atlas` takes besides the output folder (the CLI's flags, same names)."""

    model: str
    layers: tuple[str, ...] = ()  # empty: every_nth_block of the model's blocks
    every_nth_block: int = 4
    channels: tuple[int, ...] = tuple(range(16))
    dataset: str = "samples"
    steps: int = 128
    size: int = 128
    jobs: int = 4
    top_k: int = 6
    diverse_images: int = 4
    diversity: float = 20.0  # the diversity objective's weight (Lucid's scale; docs/atlas.md)
    seed: int = 0
    compare: str | None = None  # a second model: its layers at the same relative depth, side by side
    timeout: float = 900.0  # seconds per call

    def signature(self) -> dict[str, object]:
        """The options a finished unit depends on: a manifest built with others is not reused."""
        return {"dataset": self.dataset, "steps": self.steps, "size": self.size, "top_k": self.top_k,
                "diverse_images": self.diverse_images, "diversity": self.diversity, "seed": self.seed}


def parse_channels(text: str) -> tuple[int, ...]:
    """'0-3,8,10-11' -> (0, 1, 2, 3, 8, 10, 11)."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        low, dash, high = part.partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise ValueError(f"channels: {part!r} is not N or N-M")
        first, last = int(low), int(high) if dash else int(low)
        if last < first:
            raise ValueError(f"channels: {part!r} runs backwards")
        out.extend(range(first, last + 1))
    if not out:
        raise ValueError("channels: none given")
    return tuple(dict.fromkeys(out))


_BLOCK = re.compile(r"^(?:.*\.)?(?:_?blocks?|layer\d*|features|inception\w*|mixed\w*)(?:\.\d+)+$")


def blocks(details: ModelDetails) -> list[LayerInfo]:
    """The model's blocks: the children of its block containers (e.g. `_blocks.3`, `layer2.1`), or, when it
    has none, its conv/activation layers with a (C, H, W) output."""
    maps = [layer for layer in details.layers if len(layer.output_shape) == 3]
    found = [layer for layer in maps if _BLOCK.match(layer.name)]
    # Keep the outermost: `layer2.1`, not also a nested block inside it.
    outer = [b for b in found if not any(b.name.startswith(o.name + ".") for o in found if o is not b)]
    return outer or [layer for layer in maps if layer.type.lower().startswith(("conv", "relu", "samepad"))]


def choose_layers(details: ModelDetails, options: AtlasOptions) -> list[LayerInfo]:
    """The layers to map: the named ones (checked), else every nth block, always including the last."""
    if options.layers:
        known = {layer.name: layer for layer in details.layers}
        missing = [name for name in options.layers if name not in known]
        if missing:
            raise ValueError(f"model {details.info.name!r} has no layer {', '.join(map(repr, missing))}; "
                             "`convlens layers MODEL` lists them")
        flat = [name for name in options.layers if len(known[name].output_shape) != 3]
        if flat:
            raise ValueError(f"layer {flat[0]!r} has no channel map (C, H, W); pick a conv or block output")
        return [known[name] for name in options.layers]
    candidates = blocks(details)
    if not candidates:
        raise ValueError(f"model {details.info.name!r} has no layer with a channel map")
    n = max(1, options.every_nth_block)
    chosen = candidates[::n]
    if candidates[-1] not in chosen:
        chosen.append(candidates[-1])
    return chosen


def leaves(details: ModelDetails) -> list[str]:
    """The model's leaf modules that ran (an output shape), in catalog order: containers (a block, a
    Sequential) are left out, as they come before their children and would count as depth of their own."""
    parents = {p for item in details.layers for p in _prefixes(item.name)}
    return [item.name for item in details.layers if item.name not in parents and item.output_shape]


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def depth(details: ModelDetails, layer: str) -> float:
    """Relative depth 0..1 of a layer: the position of its last leaf module (for a block: where its output
    is made) among the model's leaf modules, in catalog (registration) order."""
    order = leaves(details)
    if layer not in {item.name for item in details.layers}:
        raise ValueError(f"model {details.info.name!r} has no layer {layer!r}")
    own = [i for i, name in enumerate(order) if name == layer or name.startswith(layer + ".")]
    if not own:  # a leaf that did not run (no output shape), or a container of such leaves only
        raise ValueError(f"layer {layer!r} of {details.info.name!r} did not run: it has no depth")
    return own[-1] / max(len(order) - 1, 1)


def match_depths(left: Sequence[tuple[str, float]], right: Sequence[tuple[str, float]]
                 ) -> list[tuple[str, str]]:
    """Each left layer with the right layer nearest its relative depth."""
    return [(name, min(right, key=lambda r: abs(r[1] - d))[0]) for name, d in left] if right else []


def slug(name: str) -> str:
    """A file-name-safe form of a model or layer name (dots and dashes kept)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "_"


@dataclass(frozen=True)
class UnitKey:
    model: str
    layer: str
    channel: int

    @property
    def id(self) -> str:
        return f"{self.model}/{self.layer}/{self.channel}"

    def page(self) -> str:
        """Relative to the atlas root."""
        return f"{slug(self.model)}/{slug(self.layer)}/{self.channel}.html"

    def image_dir(self) -> str:
        return f"{slug(self.model)}/{slug(self.layer)}/img"


@dataclass
class Plan:
    """The units of one model's atlas, in build order (layer by layer)."""

    details: ModelDetails
    layers: list[LayerInfo]
    units: list[UnitKey] = field(default_factory=list)


def plan(details: ModelDetails, options: AtlasOptions, layers: Sequence[str] | None = None) -> Plan:
    chosen = [details.layer(name) for name in layers] if layers is not None else choose_layers(details, options)
    units = [UnitKey(details.info.name, layer.name, c) for layer in chosen for c in options.channels
             if c < layer.output_shape[0]]
    return Plan(details, list(chosen), units)
