"""DeepDream, after google/deepdream (Mordvintsev et al. 2015): amplify what a layer already sees.

The method, step by step as the reference notebook does it:
- an octave pyramid of the input (`octaves` levels, each `octave_scale` smaller), dreamed smallest first;
- at each octave `steps_per_octave` ascent steps `x += step_size / mean(|g|) * g` on the 0..255 scale,
  with `g` the gradient of the objective, the image rolled by a random shift (up to `jitter` px) before
  the forward and rolled back after the step, and the pixels clipped to 0..255;
- only the added detail (dreamed minus the octave's base) is carried up to the next octave;
- objective: the L2 of the layer's activations ("set delta equal to the activations"), of one channel, or
  with a guide image the dot product of each position's features with the best-matching guide feature.

A job is a `DreamState`; `dream_step` advances any number of states of one image size together: one
forward, one backward, each sample its own gradient (the model is in eval mode), its own shift drawn from
its own generator and its own normalisation `mean(|g|)`, so a job's result does not depend on its company.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from convlens.server.engine.layer_features import PixelSpace, layer_features
from convlens.server.errors import InvalidArgument

# Limits a request must stay within (the service turns violations into INVALID_ARGUMENT).
MAX_OCTAVES = 8
MAX_STEPS_PER_OCTAVE = 200
MAX_SIDE = 1024
MIN_SIDE = 32  # octaves whose short side would fall below this are dropped (reported in the settings used)
MAX_JITTER = 256


@dataclass(frozen=True)
class DreamSettings:
    """google/deepdream's defaults, except the layer, which is per model."""

    layer: str
    channel: int | None = None
    octaves: int = 4
    octave_scale: float = 1.4
    steps_per_octave: int = 10
    step_size: float = 1.5  # on the 0..255 scale
    jitter: int = 32
    max_size: int = 512  # longest side the image is dreamed at
    seed: int = 0


def validate(settings: DreamSettings, *, layer_channels: int | None = None, guided: bool = False) -> None:
    """Raise InvalidArgument naming the proto field of the first setting out of range."""
    s = settings
    if not 1 <= s.octaves <= MAX_OCTAVES:
        raise InvalidArgument(f"octaves = {s.octaves} is out of range (1..{MAX_OCTAVES})", field="octaves")
    if not 1.0 < s.octave_scale <= 4.0:  # also refuses NaN
        raise InvalidArgument(f"octave_scale = {s.octave_scale} is out of range (above 1, at most 4)",
                              field="octave_scale")
    if not 1 <= s.steps_per_octave <= MAX_STEPS_PER_OCTAVE:
        raise InvalidArgument(f"steps_per_octave = {s.steps_per_octave} is out of range "
                              f"(1..{MAX_STEPS_PER_OCTAVE})", field="steps_per_octave")
    if not 0.0 < s.step_size <= 255.0:
        raise InvalidArgument(f"step_size = {s.step_size} is out of range (above 0, at most 255, on the "
                              "0..255 pixel scale; 1.5 is google/deepdream's)", field="step_size")
    if not 0 <= s.jitter <= MAX_JITTER:
        raise InvalidArgument(f"jitter = {s.jitter} is out of range (0..{MAX_JITTER} pixels)", field="jitter")
    if not MIN_SIDE <= s.max_size <= MAX_SIDE:
        raise InvalidArgument(f"max_size = {s.max_size} is out of range ({MIN_SIDE}..{MAX_SIDE})",
                              field="max_size")
    if s.channel is not None:
        if guided:
            raise InvalidArgument("channel and guide cannot be combined: a guide sets the objective for the "
                                  "whole layer", field="channel")
        if layer_channels is not None and not 0 <= s.channel < layer_channels:
            raise InvalidArgument(f"channel {s.channel} is out of range: layer {s.layer!r} has "
                                  f"{layer_channels} channels (0..{layer_channels - 1})", field="channel")


def fit_size(height: int, width: int, max_size: int) -> tuple[int, int]:
    """(height, width) scaled down so the longest side is at most max_size (never up)."""
    scale = min(1.0, max_size / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def octave_sizes(height: int, width: int, octaves: int, scale: float) -> list[tuple[int, int]]:
    """Sizes of the pyramid, smallest first, the base last; octaves below MIN_SIDE are dropped."""
    sizes = [(height, width)]
    for k in range(1, octaves):
        h, w = round(height / scale**k), round(width / scale**k)
        if min(h, w) < MIN_SIDE:
            break
        sizes.append((h, w))
    return sizes[::-1]


def resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of [3, H, W] or [B, 3, H, W] (corners to corners, as scipy's zoom, order 1)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image.clone()
    batch = image if image.ndim == 4 else image[None]
    out = F.interpolate(batch, size=size, mode="bilinear", align_corners=True)
    return out if image.ndim == 4 else out[0]


# ---------------------------------------------------------------- objectives (one sample's activations)

Objective = Callable[[torch.Tensor], torch.Tensor]  # [C, H, W] activations -> scalar


def l2_objective(channel: int | None = None) -> Objective:
    """Mean squared activation of the layer (or of one channel): its gradient is the activations."""

    def objective(act: torch.Tensor) -> torch.Tensor:
        a = act if channel is None else act[channel]
        return a.pow(2).mean()

    return objective


def guide_objective(guide: torch.Tensor) -> Objective:
    """google/deepdream's guided objective: each position's features dotted with the best-matching guide
    feature (the match chosen without gradient), averaged over positions.

    `guide` is the guide image's features at the layer, [C, H', W'] (or [C, M]).
    """
    y = guide.detach().reshape(guide.shape[0], -1)  # C, M

    def objective(act: torch.Tensor) -> torch.Tensor:
        x = act.reshape(act.shape[0], -1)  # C, P
        with torch.no_grad():
            best = (x.T @ y).argmax(dim=1)  # P: index of the best-matching guide feature
        return (x * y[:, best]).sum(dim=0).mean()

    return objective


# ---------------------------------------------------------------- one job's state


@dataclass
class DreamState:
    """One dream in progress: the pyramid, the detail carried so far, the current image, its generator."""

    settings: DreamSettings
    bases: list[torch.Tensor]  # [3, h, w] 0..255 per octave, smallest first
    objective: Objective
    generator: torch.Generator
    octave: int = 0
    step_in_octave: int = 0
    pixels: torch.Tensor = field(init=False)
    last_objective: float = float("nan")

    def __post_init__(self) -> None:
        self.pixels = self.bases[0].clone()

    @property
    def size(self) -> tuple[int, int]:
        h, w = self.pixels.shape[-2:]
        return int(h), int(w)

    @property
    def total_steps(self) -> int:
        return len(self.bases) * self.settings.steps_per_octave

    @property
    def steps_done(self) -> int:
        return self.octave * self.settings.steps_per_octave + self.step_in_octave

    @property
    def done(self) -> bool:
        return self.octave >= len(self.bases)

    def draw_shift(self) -> tuple[int, int]:
        j = self.settings.jitter
        if j == 0:
            return 0, 0
        oy, ox = torch.randint(-j, j + 1, (2,), generator=self.generator).tolist()
        return int(oy), int(ox)

    def advance(self, pixels: torch.Tensor, objective: float) -> None:
        """Take the image after one step; at the end of an octave carry the detail up to the next."""
        self.pixels = pixels
        self.last_objective = objective
        self.step_in_octave += 1
        if self.step_in_octave < self.settings.steps_per_octave:
            return
        detail = self.pixels - self.bases[self.octave]
        self.octave += 1
        self.step_in_octave = 0
        if not self.done:
            base = self.bases[self.octave]
            self.pixels = base + resize(detail, tuple(base.shape[-2:]))  # type: ignore[arg-type]


def start(image: torch.Tensor, settings: DreamSettings, objective: Objective) -> DreamState:
    """A dream of `image` ([3, H, W], 0..255) with the settings it will actually use.

    The image is scaled down to `max_size` first; `settings.octaves` in the returned state is the number of
    octaves kept (those whose short side stays at least MIN_SIDE).
    """
    h, w = fit_size(int(image.shape[-2]), int(image.shape[-1]), settings.max_size)
    base = resize(image.float(), (h, w)).clamp(0.0, 255.0)
    sizes = octave_sizes(h, w, settings.octaves, settings.octave_scale)
    bases = [resize(base, size) for size in sizes]
    used = replace(settings, octaves=len(bases))
    return DreamState(used, bases, objective, torch.Generator().manual_seed(settings.seed))


# ---------------------------------------------------------------- one step for a batch of jobs


def dream_step(model: nn.Module, space: PixelSpace, states: Sequence[DreamState]) -> None:
    """One ascent step for every state (same size and layer): roll, forward, backward, normalised step,
    roll back, clip. Each state advances in place."""
    if not states:
        return
    layer = states[0].settings.layer
    size = states[0].size
    if any(s.size != size or s.settings.layer != layer for s in states):
        raise ValueError("dream_step needs states of one size and layer")
    shifts = [s.draw_shift() for s in states]
    rolled = torch.stack([torch.roll(s.pixels, sh, dims=(-2, -1)) for s, sh in zip(states, shifts, strict=True)])
    rolled = rolled.to(next(iter(model.parameters()), rolled).device).requires_grad_(True)
    act = layer_features(model, rolled, [layer], space)[layer]
    values = torch.stack([s.objective(act[i]) for i, s in enumerate(states)])
    (grad,) = torch.autograd.grad(values.sum(), rolled)
    with torch.no_grad():
        scale = grad.abs().flatten(1).mean(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        stepped = rolled.detach() + torch.tensor([s.settings.step_size for s in states],
                                                 device=grad.device).view(-1, 1, 1, 1) * grad / scale
        for i, (s, (oy, ox)) in enumerate(zip(states, shifts, strict=True)):
            s.advance(torch.roll(stepped[i], (-oy, -ox), dims=(-2, -1)).clamp(0.0, 255.0).to(s.pixels.device),
                      float(values[i]))


def layer_objective(model: nn.Module, space: PixelSpace, image: torch.Tensor, layer: str,
                    objective: Objective) -> float:
    """The objective on one [3, H, W] image, by a plain forward pass (no jitter)."""
    with torch.no_grad():
        act = layer_features(model, image[None].float(), [layer], space)[layer]
        return float(objective(act[0]))


def guide_features(model: nn.Module, space: PixelSpace, guide: torch.Tensor, layer: str,
                   longest_side: int) -> torch.Tensor:
    """The guide's features [C, H', W'] at `layer`, the guide scaled to `longest_side`."""
    h, w = fit_size(int(guide.shape[-2]), int(guide.shape[-1]), longest_side)
    scale_up = longest_side / max(guide.shape[-2:])
    if scale_up > 1:
        h, w = max(1, round(guide.shape[-2] * scale_up)), max(1, round(guide.shape[-1] * scale_up))
    with torch.no_grad():
        return layer_features(model, resize(guide.float(), (h, w))[None], [layer], space)[layer][0]


def dream(model: nn.Module, space: PixelSpace, image: torch.Tensor, settings: DreamSettings,
          objective: Objective, *, on_step: Callable[[DreamState], None] | None = None) -> DreamState:
    """Run one dream alone to the end (the service batches many through `dream_step` instead)."""
    state = start(image, settings, objective)
    while not state.done:
        dream_step(model, space, [state])
        if on_step is not None:
            on_step(state)
    return state


def steps_total(height: int, width: int, settings: DreamSettings) -> int:
    """How many steps a dream of an image this size will take."""
    h, w = fit_size(height, width, settings.max_size)
    return len(octave_sizes(h, w, settings.octaves, settings.octave_scale)) * settings.steps_per_octave

