"""DeepDream, after google/deepdream (Mordvintsev et al. 2015): amplify what a layer already sees.

The method, step by step as the reference notebook does it:
- an octave pyramid of the input (`octaves` levels, each `octave_scale` smaller), dreamed smallest first;
- at each octave `steps_per_octave` ascent steps `x += step_size / mean(|g|) * g` on the 0..255 scale,
  with `g` the gradient of the objective, the image rolled by a random shift (up to `jitter` px) before
  the forward and rolled back after the step, and the pixels clipped to 0..255;
- only the added detail (dreamed minus the octave's base) is carried up to the next octave;
- objective: the L2 of the layer's activations ("set delta equal to the activations"), of one channel, or
  with a guide image the dot product of each position's features with the best-matching guide feature.

A dream is a `DreamJob` of the optimisation core: the core's runner steps every job of one key (layer and
image size) together, one forward and one backward; each job has its own gradient (the model is in eval
mode), its own shift drawn from its own generator and its own normalisation `mean(|g|)`, so a job's result
does not depend on its company.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from convlens.server.engine.layer_features import PixelSpace, layer_features
from convlens.server.engine.optimize.job import StepLoss, StepReport
from convlens.server.engine.optimize.objectives import Activations
from convlens.server.engine.optimize.optimizers import NormalizedGradient
from convlens.server.engine.optimize.runner import run_step
from convlens.server.errors import Violations

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


def validate(settings: DreamSettings, *, layer_channels: int | None = None, guided: bool = False,
             violations: Violations | None = None) -> None:
    """Check every setting; each one out of range is a violation naming its proto field. Raises
    InvalidArgument with all of them, unless `violations` is given (then they are only added to it)."""
    s = settings
    v = Violations() if violations is None else violations
    v.check(1 <= s.octaves <= MAX_OCTAVES, "octaves", f"octaves = {s.octaves} is out of range (1..{MAX_OCTAVES})")
    v.check(1.0 < s.octave_scale <= 4.0, "octave_scale",  # also refuses NaN
            f"octave_scale = {s.octave_scale} is out of range (above 1, at most 4)")
    v.check(1 <= s.steps_per_octave <= MAX_STEPS_PER_OCTAVE, "steps_per_octave",
            f"steps_per_octave = {s.steps_per_octave} is out of range (1..{MAX_STEPS_PER_OCTAVE})")
    v.check(0.0 < s.step_size <= 255.0, "step_size", f"step_size = {s.step_size} is out of range (above 0, at "
            "most 255, on the 0..255 pixel scale; 1.5 is google/deepdream's)")
    v.check(0 <= s.jitter <= MAX_JITTER, "jitter", f"jitter = {s.jitter} is out of range (0..{MAX_JITTER} pixels)")
    v.check(MIN_SIDE <= s.max_size <= MAX_SIDE, "max_size",
            f"max_size = {s.max_size} is out of range ({MIN_SIDE}..{MAX_SIDE})")
    if s.channel is not None:
        if guided:
            v.add("channel", "channel and guide cannot be combined: a guide sets the objective for the whole layer")
        elif layer_channels is not None and not 0 <= s.channel < layer_channels:
            v.add("channel", f"channel {s.channel} is out of range: layer {s.layer!r} has "
                  f"{layer_channels} channels (0..{layer_channels - 1})")
    if violations is None:
        v.raise_if_any()


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

LayerObjective = Callable[[torch.Tensor], torch.Tensor]  # [C, H, W] activations -> scalar


def l2_objective(channel: int | None = None) -> LayerObjective:
    """Mean squared activation of the layer (or of one channel): its gradient is the activations."""

    def objective(act: torch.Tensor) -> torch.Tensor:
        a = act if channel is None else act[channel]
        return a.pow(2).mean()

    return objective


def guide_objective(guide: torch.Tensor) -> LayerObjective:
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


# ---------------------------------------------------------------- one dream as a Job of the core


class DreamJob:
    """One dream as a Job of the optimisation core (engine/optimize/job.py).

    The parameter is the image itself, [1, 3, h, w] on the 0..255 scale; it is replaced by a larger one at
    each octave, so the key (which carries the size) changes too and the job moves to the batch of its
    new size. The optimiser is the core's `NormalizedGradient` on the loss -objective: p += step_size *
    g / mean|g|. The roll happens inside `make_input`, so the gradient arrives rolled back, and stepping
    the unrolled image equals google's roll, step, roll back.
    """

    def __init__(self, image: torch.Tensor, settings: DreamSettings, objective: LayerObjective, *,
                 mean: Sequence[float], std: Sequence[float], device: torch.device | None = None) -> None:
        device = device or image.device
        h, w = fit_size(int(image.shape[-2]), int(image.shape[-1]), settings.max_size)
        base = resize(image.to(device, torch.float32), (h, w)).clamp(0.0, 255.0)
        self.bases = [resize(base, size) for size in octave_sizes(h, w, settings.octaves, settings.octave_scale)]
        self.settings = replace(settings, octaves=len(self.bases))  # the octaves actually used
        self.objective = objective
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.optimizer = NormalizedGradient(settings.step_size)
        self.layers = frozenset({settings.layer})
        self._space = PixelSpace((mean[0], mean[1], mean[2]), (std[0], std[1], std[2]))
        self.octave = 0
        self.step = 0
        self._step_in_octave = 0
        self._set_pixels(self.bases[0])

    def _set_pixels(self, pixels: torch.Tensor) -> None:
        self.pixels = pixels.detach().clone()[None].requires_grad_(True)
        self.params = [self.pixels]
        self.key: tuple[object, ...] = ("dream", self.settings.layer, tuple(self.pixels.shape[-2:]))

    @property
    def total_steps(self) -> int:
        return len(self.bases) * self.settings.steps_per_octave

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps

    def draw_shift(self) -> tuple[int, int]:
        j = self.settings.jitter
        if j == 0:
            return 0, 0
        oy, ox = torch.randint(-j, j + 1, (2,), generator=self.generator).tolist()
        return int(oy), int(ox)

    def make_input(self) -> torch.Tensor:
        batch: torch.Tensor = self._space.normalize(torch.roll(self.pixels, self.draw_shift(), dims=(-2, -1)))
        return batch

    def loss(self, acts: Activations, row: int) -> StepLoss:
        value = self.objective(acts.layer(self.settings.layer, row))
        return StepLoss(-value, {"objective": value})

    def after_step(self, grads: list[torch.Tensor], loss: StepLoss) -> StepReport:
        octave = self.octave  # the octave this step ran in
        with torch.no_grad():
            self.pixels.clamp_(0.0, 255.0)
        self.step += 1
        self._step_in_octave += 1
        if self._step_in_octave == self.settings.steps_per_octave:  # carry the detail up an octave
            detail = self.pixels.detach()[0] - self.bases[self.octave]
            self.octave += 1
            self._step_in_octave = 0
            if self.octave < len(self.bases):
                base = self.bases[self.octave]
                self._set_pixels(base + resize(detail, (int(base.shape[-2]), int(base.shape[-1]))))
        return StepReport(self.step, self.total_steps, {"objective": float(loss.terms["objective"])}, self.done,
                          octave=octave)

    def picture(self) -> torch.Tensor:
        """The current image, [3, H, W] on the 0..255 scale."""
        return self.pixels.detach()[0].clamp(0.0, 255.0)


def layer_objective(model: nn.Module, space: PixelSpace, image: torch.Tensor, layer: str,
                    objective: LayerObjective) -> float:
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
        features: torch.Tensor = layer_features(model, resize(guide.float(), (h, w))[None], [layer], space)[layer][0]
    return features


def dream(model: nn.Module, image: torch.Tensor, settings: DreamSettings, objective: LayerObjective, *,
          mean: Sequence[float], std: Sequence[float]) -> DreamJob:
    """Run one dream alone to the end (the service steps many together through the scheduler)."""
    job = DreamJob(image, settings, objective, mean=mean, std=std)
    while not job.done:
        run_step(model, [job])
    return job


def steps_total(height: int, width: int, settings: DreamSettings) -> int:
    """How many steps a dream of an image this size will take."""
    h, w = fit_size(height, width, settings.max_size)
    return len(octave_sizes(h, w, settings.octaves, settings.octave_scale)) * settings.steps_per_octave

