"""Activation maximisation as a Job: x <- argmax S(x) + R(x), with the lecture's, Lucid's and MACO's recipes.

`MaximizeSettings.resolve(preset, **overrides)` gives every knob's value (the settings actually used, so a
caller can reproduce a picture); `MaximizeJob(settings, objective, ...)` is the job the step runner and
the scheduler drive; `evaluate(module, jobs)` scores the final images (no transforms) in one batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from convlens.server.engine.hooks import capture_outputs, eval_mode
from convlens.server.engine.optimize import regularizers, transforms
from convlens.server.engine.optimize.job import StepLoss, StepReport
from convlens.server.engine.optimize.natural_spectrum import average_magnitude
from convlens.server.engine.optimize.objectives import Activations, Objective
from convlens.server.engine.optimize.optimizers import Adam
from convlens.server.engine.optimize.param import FourierParam, ImageParam, MacoParam, PixelParam
from convlens.server.errors import InvalidArgument, Violations

PRESETS = ("lecture", "lucid", "maco")
PARAMETERIZATIONS = ("pixel", "fft", "maco")
MAX_STEPS = 4096
MIN_SIZE, MAX_SIZE = 32, 1024
MIN_INPUT_SIDE = 16  # pixels left after padding and jitter


def knob(default: Any, low: float, high: float) -> Any:
    """A numeric setting a caller may override (a MaximizeUnit request field of the same name), in low..high."""
    return field(default=default, metadata={"range": (low, high)})


@dataclass(frozen=True)
class MaximizeSettings:
    """Every knob of a MaximizeUnit run. Percentiles are 0..100; sizes and offsets are in pixels.

    The numeric knobs' names and ranges are declared here, once (`knob`); `KNOBS` lists them for the
    codec (which request fields to read) and `MaximizeSettings.checked` checks them."""

    preset: str = "lucid"
    parameterization: str = "fft"  # pixel | fft | maco
    steps: int = knob(512, 1, MAX_STEPS)
    size: int = knob(224, MIN_SIZE, MAX_SIZE)
    learning_rate: float = knob(0.05, 1e-6, 100.0)  # Adam
    l2_decay: float = knob(0.0, 0.0, 1.0)  # pixel: x <- (1 - l2) x after each step
    blur_every: int = knob(0, 0, MAX_STEPS)  # pixel: Gaussian blur every n steps (0: never)
    blur_sigma: float = knob(0.0, 0.0, 20.0)
    value_percentile: float = knob(0.0, 0.0, 100.0)  # pixel: zero pixels whose norm is below this percentile
    contribution_percentile: float = knob(0.0, 0.0, 100.0)  # pixel: zero pixels whose |x * grad| is below it
    tv_weight: float = knob(0.0, 0.0, 1e6)  # total-variation penalty on the image, added to the loss
    pad: int = knob(12, 0, 256)
    jitter: int = knob(8, 0, 256)
    scale_jitter: float = knob(0.1, 0.0, 0.9)  # zoom in 1 +- scale_jitter
    rotate_degrees: float = knob(10.0, 0.0, 180.0)
    final_jitter: int = knob(4, 0, 256)
    decay_power: float = knob(1.0, 0.0, 4.0)  # fft: spectrum scaled by 1 / frequency ** decay_power
    seed: int = knob(0, 0, 2**63 - 1)

    @staticmethod
    def checked(preset: str | None = None, violations: Violations | None = None,
                **overrides: Any) -> MaximizeSettings:
        """`resolve`, for a caller's request: one INVALID_ARGUMENT naming every bad field (an unknown preset or
        parameterization, each knob out of its range, and whatever the caller already gathered in
        `violations`), then a size that padding and jitter leave too small."""
        v = Violations() if violations is None else violations
        if preset is not None and preset not in PRESETS:
            v.add("preset", f"unknown preset {preset!r}; one of {', '.join(PRESETS)}")
        for name, value in overrides.items():
            if value is None or name not in KNOBS:
                continue
            low, high = KNOBS[name]
            v.check(low <= value <= high, name, f"{name} = {value} is out of range; allowed {low:g}..{high:g}")
        p = overrides.get("parameterization")
        if p is not None and p not in PARAMETERIZATIONS:
            v.add("parameterization", f"unknown parameterization {p!r}")
        v.raise_if_any()
        settings = MaximizeSettings.resolve(preset, **overrides)
        if settings.input_side() < MIN_INPUT_SIDE:
            raise InvalidArgument(f"size {settings.size} leaves a {settings.input_side()} px input after padding "
                                  "and jitter; use a larger size or less jitter", field="size")
        return settings

    @staticmethod
    def resolve(preset: str | None = None, **overrides: Any) -> MaximizeSettings:
        """The preset's settings with every override that is not None applied."""
        name = preset or "lucid"
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; one of {', '.join(PRESETS)}")
        base = _PRESETS[name]
        known = {f.name for f in fields(MaximizeSettings)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown settings {unknown}")
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def transforms(self) -> list[transforms.Transform]:
        return transforms.standard(self.pad, self.jitter, self.scale_jitter, self.rotate_degrees,
                                   self.final_jitter)

    def input_side(self) -> int:
        return transforms.output_size(self.transforms(), self.size)


# {knob: (lowest, highest)}, read off the fields above.
KNOBS: dict[str, tuple[float, float]] = {f.name: f.metadata["range"] for f in fields(MaximizeSettings)
                                         if "range" in f.metadata}

_PRESETS = {
    # Yosinski et al. 2015's most used defaults (L2 1e-4, blur 1.0 every 4 steps), the lecture's "zero out
    # pixels with small value", and jitter; Adam on the pixels at lr 0.05 (0.01 left the images near grey: Lite2
    # top-5 4/10 at 128 steps; 0.05 gave 7/10 at 256 steps, docs/quality.md).
    "lecture": MaximizeSettings(preset="lecture", parameterization="pixel", steps=1000, learning_rate=0.05,
                                l2_decay=1e-4, blur_every=4, blur_sigma=1.0, value_percentile=5.0,
                                pad=0, jitter=8, scale_jitter=0.0, rotate_degrees=0.0, final_jitter=0),
    # Lucid / Lucent: FFT + decorrelated colour + sigmoid, Adam 0.05, 512 steps, standard transforms.
    "lucid": MaximizeSettings(preset="lucid"),
    # MACO: phase only, magnitude of natural photos; same transforms.
    "maco": MaximizeSettings(preset="maco", parameterization="maco", learning_rate=0.2),
}


def make_param(settings: MaximizeSettings, generator: torch.Generator, device: torch.device) -> ImageParam:
    if settings.parameterization == "pixel":
        return PixelParam(settings.size, generator, device)
    if settings.parameterization == "fft":
        return FourierParam(settings.size, generator, device, decay_power=settings.decay_power)
    if settings.parameterization == "maco":
        return MacoParam(average_magnitude(settings.size), generator, device)
    raise ValueError(f"unknown parameterization {settings.parameterization!r}")


class MaximizeJob:
    """One MaximizeUnit run on one device (see job.py for the contract)."""

    def __init__(self, settings: MaximizeSettings, objective: Objective, *, mean: Sequence[float],
                 std: Sequence[float], device: torch.device) -> None:
        self.settings = settings
        self.objective = objective
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.param = make_param(settings, self.generator, device)
        self.params = self.param.params
        self.optimizer = Adam(settings.learning_rate)
        self._transforms = settings.transforms()
        self._mean = torch.tensor(list(mean), device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(list(std), device=device).view(1, 3, 1, 1)
        self.layers = objective.layers
        self.key = ("maximize", settings.input_side(), tuple(sorted(self.layers)))
        self.step = 0
        self._image: torch.Tensor | None = None

    @property
    def done(self) -> bool:
        return self.step >= self.settings.steps

    def normalise(self, image: torch.Tensor) -> torch.Tensor:
        return (image - self._mean) / self._std

    def make_input(self) -> torch.Tensor:
        self._image = self.param.image()
        return self.normalise(transforms.apply(self._transforms, self._image, self.generator))

    def loss(self, acts: Activations, row: int) -> StepLoss:
        terms = self.objective.terms(acts, row)
        if len(terms) == 1:  # one part: its value is "objective" itself, sent once (not under two keys)
            terms = {}
        value = self.objective(acts, row)
        total = -value
        if self.settings.tv_weight > 0 and self._image is not None:
            tv = regularizers.total_variation(self._image)
            terms = {**terms, "tv": tv}
            total = total + self.settings.tv_weight * tv
        return StepLoss(total, {"objective": value, **terms})

    def after_step(self, grads: list[torch.Tensor], loss: StepLoss) -> StepReport:
        self.step += 1
        s = self.settings
        if isinstance(self.param, PixelParam):
            pixels = self.param.pixels
            regularizers.decay(pixels, s.l2_decay)
            if s.blur_every and self.step % s.blur_every == 0:
                regularizers.blur(pixels, s.blur_sigma)
            regularizers.zero_small_values(pixels, s.value_percentile)
            regularizers.zero_small_contributions(pixels, -grads[0], s.contribution_percentile)
        self.param.project()
        self._image = None
        return StepReport(self.step, s.steps, {k: float(v) for k, v in loss.terms.items()}, self.done)

    @torch.no_grad()
    def image(self) -> torch.Tensor:
        """The current image [3, H, W] in [0, 1], on the CPU."""
        return self.param.image()[0].detach().clamp(0, 1).cpu()

    def image_uint8(self) -> np.ndarray:
        """[H, W, 3] uint8, for PNGs."""
        return (self.image().permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)


@dataclass(frozen=True)
class Evaluation:
    objective: float  # the objective on the final image, untransformed
    logits: torch.Tensor  # [K] on the CPU


@torch.no_grad()
def evaluate(module: nn.Module, jobs: Sequence[MaximizeJob]) -> list[Evaluation]:
    """Score the jobs' current images (no transforms) in one forward; jobs must share the image size."""
    layers = sorted(frozenset().union(*(job.layers for job in jobs)))
    with eval_mode(module), capture_outputs(module, layers) as captured:
        batch = torch.cat([job.normalise(job.param.image()) for job in jobs])
        logits = module(batch)
    acts = Activations(logits, dict(captured.outputs))
    return [Evaluation(float(job.objective(acts, row)), logits[row].cpu()) for row, job in enumerate(jobs)]
