"""Gatys et al. style transfer: an image whose Gram matrices match a style image's and whose features at
one deeper layer match a content image's.

    G(f)_km   = sum_p f_k(p) f_m(p) / norm           f: one layer's [C, H, W] features, p: positions
    L_style   = sum_l w_l * mean_km (G(f_l(x)) - G(f_l(style)))^2           style_distance "mse" (Gatys)
              = sum_l w_l * ||G(f_l(x)) - G(f_l(style))||^2 / ||G(f_l(style))||^2    "relative"
    L_content = mean (f_c(x) - f_c(content))^2
    L         = style_weight * L_style + content_weight * L_content

The "relative" style distance makes each layer count alike whatever the scale of its features (raw
activations of a network without a softmax-like last stage differ by orders of magnitude between layers, and
"mse" then weighs almost only the loudest layer); it is also independent of the Gram normalisation.

Gram normalisation: "positions" divides by H*W (the expectation over positions Gatys writes; independent
of the image size), "elements" by C*H*W (the PyTorch tutorial's a*b*c*d with one image), "none" by 1.

Softening (Wang et al., CVPR 2021): residual networks' features are peaky (low entropy) and make the Gram
match weak; a softmax transform of the features before the Gram and content losses fixes it. Variants:
"channels" (softmax over channels at each position, their code's Softmax2d), "positions" (softmax over the
positions of each channel), "all" (softmax over every C*H*W activation of the layer, the other alternative
in their code), each at a temperature, and rescaled by the number of entries so the mean is 1 (then the
weights mean the same with and without softening).

A transfer is a `StyleJob` of the optimisation core. Optimisers: Adam (default) is per job and
element-wise, so a job's steps batch with other jobs' of the same size and layers and give the same image
alone or batched. L-BFGS (the tutorial's) keeps a history over the whole image and runs alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from convlens.server.engine.layer_features import PixelSpace, layer_features
from convlens.server.engine.optimize.dream import resize
from convlens.server.engine.optimize.job import StepLoss, StepReport
from convlens.server.engine.optimize.objectives import Activations
from convlens.server.engine.optimize.optimizers import LBFGS, Adam, Optimizer
from convlens.server.engine.optimize.runner import run_step
from convlens.server.errors import Violations

SOFTEN = ("none", "channels", "positions", "all")
GRAM_NORMALIZATIONS = ("positions", "elements", "none")
STYLE_DISTANCES = ("mse", "relative")
INITS = ("content", "noise")
OPTIMIZERS = ("adam", "lbfgs")

MAX_STEPS = 2000
MAX_SIDE = 1024
MIN_SIDE = 32
MAX_STYLE_LAYERS = 16


@dataclass(frozen=True)
class StyleSettings:
    style_layers: tuple[str, ...]
    content_layer: str
    style_layer_weights: tuple[float, ...] = ()  # empty: 1 for each style layer
    style_weight: float = 1e4
    content_weight: float = 1.0
    steps: int = 300
    size: int = 256  # longest side of the output
    init: str = "content"
    optimizer: str = "adam"
    learning_rate: float = 2.0  # Adam, on the 0..255 pixel scale
    soften: str = "none"
    temperature: float = 1.0
    gram_normalization: str = "positions"
    style_distance: str = "mse"
    seed: int = 0

    @property
    def layer_weights(self) -> tuple[float, ...]:
        return self.style_layer_weights or (1.0,) * len(self.style_layers)

    @property
    def layers(self) -> tuple[str, ...]:
        """Every layer read, style layers first, without repeats."""
        return tuple(dict.fromkeys((*self.style_layers, self.content_layer)))


def validate(s: StyleSettings, violations: Violations | None = None) -> None:
    """Check every setting; each one out of range is a violation naming its proto field. Raises
    InvalidArgument with all of them, unless `violations` is given (then they are only added to it)."""
    v = Violations() if violations is None else violations
    if not s.style_layers:
        v.add("style_layers", "style_layers is empty: name at least one layer")
    v.check(len(s.style_layers) <= MAX_STYLE_LAYERS, "style_layers",
            f"{len(s.style_layers)} style layers; at most {MAX_STYLE_LAYERS}")
    if s.style_layer_weights and len(s.style_layer_weights) != len(s.style_layers):
        v.add("style_layer_weights", f"style_layer_weights has {len(s.style_layer_weights)} entries for "
              f"{len(s.style_layers)} style layers; give one per layer or none")
    elif any(not w >= 0 for w in s.style_layer_weights):
        v.add("style_layer_weights", "style_layer_weights must be non-negative")
    for name, value in (("style_weight", s.style_weight), ("content_weight", s.content_weight)):
        v.check(0 <= value < float("inf"), name, f"{name} = {value} must be a finite non-negative number")
    v.check(1 <= s.steps <= MAX_STEPS, "steps", f"steps = {s.steps} is out of range (1..{MAX_STEPS})")
    v.check(MIN_SIDE <= s.size <= MAX_SIDE, "size", f"size = {s.size} is out of range ({MIN_SIDE}..{MAX_SIDE})")
    v.check(s.init in INITS, "init", f"unknown init {s.init!r}; use one of {', '.join(INITS)}")
    v.check(s.optimizer in OPTIMIZERS, "optimizer",
            f"unknown optimizer {s.optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
    v.check(0 < s.learning_rate <= 255, "learning_rate", f"learning_rate = {s.learning_rate} is out of range "
            "(above 0, at most 255 on the 0..255 pixel scale)")
    v.check(s.soften in SOFTEN, "soften", f"unknown soften {s.soften!r}; use one of {', '.join(SOFTEN)}")
    v.check(1e-3 <= s.temperature <= 1e3, "temperature",
            f"temperature = {s.temperature} is out of range (0.001..1000)")
    v.check(s.style_distance in STYLE_DISTANCES, "style_distance",
            f"unknown style_distance {s.style_distance!r}; use one of {', '.join(STYLE_DISTANCES)}")
    v.check(s.gram_normalization in GRAM_NORMALIZATIONS, "gram_normalization",
            f"unknown gram_normalization {s.gram_normalization!r}; use one of {', '.join(GRAM_NORMALIZATIONS)}")
    if violations is None:
        v.raise_if_any()


# ---------------------------------------------------------------- the math, on one image's features


def gram(features: torch.Tensor, normalization: str = "positions") -> torch.Tensor:
    """Gram matrix [C, C] of [C, H, W] features (or [B, C, C] of [B, C, H, W])."""
    f = features.flatten(-2)  # (B,) C, P
    g = f @ f.transpose(-1, -2)
    c, p = f.shape[-2], f.shape[-1]
    if normalization == "positions":
        return g / p
    if normalization == "elements":
        return g / (c * p)
    if normalization == "none":
        return g
    raise ValueError(f"unknown Gram normalisation {normalization!r}")


def soften(features: torch.Tensor, mode: str = "none", temperature: float = 1.0) -> torch.Tensor:
    """Wang et al.'s softmax transform of [C, H, W] features, rescaled so the mean entry is 1."""
    if mode == "none":
        return features
    c, h, w = features.shape[-3:]
    t = features / temperature
    if mode == "channels":
        return c * torch.softmax(t, dim=-3)
    if mode == "positions":
        return (h * w) * torch.softmax(t.flatten(-2), dim=-1).reshape(t.shape)
    if mode == "all":
        return (c * h * w) * torch.softmax(t.flatten(-3), dim=-1).reshape(t.shape)
    raise ValueError(f"unknown softening {mode!r}")


def style_distance(g: torch.Tensor, target: torch.Tensor, mode: str = "mse") -> torch.Tensor:
    """One layer's style term: the mean squared difference of the Grams, or relative to the target's norm."""
    if mode == "mse":
        return (g - target).pow(2).mean()
    if mode == "relative":
        return (g - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-12)
    raise ValueError(f"unknown style distance {mode!r}")


@dataclass(frozen=True)
class StyleTargets:
    """What a job's image is pulled toward: the style image's Grams and the content image's features."""

    grams: dict[str, torch.Tensor]  # style layer -> [C, C]
    content: torch.Tensor  # [C, H, W] at the content layer, softened as the settings say


def targets_from_features(settings: StyleSettings, style_features: Mapping[str, torch.Tensor],
                          content_features: Mapping[str, torch.Tensor]) -> StyleTargets:
    """Targets from one style image's and one content image's [C, H, W] features."""
    s = settings
    grams = {layer: gram(soften(style_features[layer], s.soften, s.temperature), s.gram_normalization).detach()
             for layer in s.style_layers}
    content = soften(content_features[s.content_layer], s.soften, s.temperature).detach()
    return StyleTargets(grams, content)


def loss_terms(settings: StyleSettings, targets: StyleTargets,
               features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Scalar losses of one image from its [C, H, W] features: style, content and the weighted total."""
    s = settings
    style = torch.zeros((), device=targets.content.device)
    for layer, w in zip(s.style_layers, s.layer_weights, strict=True):
        g = gram(soften(features[layer], s.soften, s.temperature), s.gram_normalization)
        style = style + w * style_distance(g, targets.grams[layer], s.style_distance)
    content = (soften(features[s.content_layer], s.soften, s.temperature) - targets.content).pow(2).mean()
    return {"style": style, "content": content, "total": s.style_weight * style + s.content_weight * content}


# ---------------------------------------------------------------- one transfer as a Job of the core


class StyleJob:
    """One style transfer as a Job of the optimisation core (engine/optimize/job.py).

    The parameter is the image, [1, 3, H, W] on the 0..255 scale. Adam (the core's per-job `Adam`, stacked
    across the jobs of a batch) clips it to 0..255 after each step; L-BFGS (strong-Wolfe line search, one
    iteration per step, a key of its own so it runs alone) is not clipped between iterations: clipping
    moves the point under the line search and its curvature history (with clipping it stalled at a loss
    100x higher on the test net); `picture()` clips the result.
    """

    def __init__(self, settings: StyleSettings, targets: StyleTargets, start_image: torch.Tensor, *,
                 mean: Sequence[float], std: Sequence[float]) -> None:
        self.settings = settings
        self.targets = targets
        self.image = start_image.detach().clone()[None].requires_grad_(True)
        self.params = [self.image]
        self.optimizer: Optimizer
        if settings.optimizer == "lbfgs":
            self.optimizer = LBFGS(lr=1.0, max_iter=1, history_size=100, line_search_fn="strong_wolfe",
                                   tolerance_grad=0.0, tolerance_change=0.0)
        else:
            self.optimizer = Adam(settings.learning_rate)
        self.layers = frozenset(settings.layers)
        self._space = PixelSpace((mean[0], mean[1], mean[2]), (std[0], std[1], std[2]))
        size = tuple(self.image.shape[-2:])
        alone: tuple[object, ...] = (id(self),) if self.optimizer.needs_closure else ()
        self.key: tuple[object, ...] = ("style", size, tuple(sorted(self.layers)), *alone)
        self.step = 0
        self.losses: dict[str, float] = {}

    @property
    def done(self) -> bool:
        return self.step >= self.settings.steps

    def make_input(self) -> torch.Tensor:
        batch: torch.Tensor = self._space.normalize(self.image)
        return batch

    def loss(self, acts: Activations, row: int) -> StepLoss:
        terms = loss_terms(self.settings, self.targets, {k: acts.layer(k, row) for k in self.settings.layers})
        return StepLoss(terms["total"], terms)

    def after_step(self, grads: list[torch.Tensor], loss: StepLoss) -> StepReport:
        if not self.optimizer.needs_closure:
            with torch.no_grad():
                self.image.clamp_(0.0, 255.0)
        self.step += 1
        self.losses = {k: float(v) for k, v in loss.terms.items()}
        return StepReport(self.step, self.settings.steps, dict(self.losses), self.done)

    def picture(self) -> torch.Tensor:
        """The current image, [3, H, W] on the 0..255 scale."""
        return self.image.detach()[0].clamp(0.0, 255.0)


def output_size(height: int, width: int, size: int) -> tuple[int, int]:
    """The content image's (height, width) scaled so the longest side is `size` (up or down)."""
    scale = size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def prepare_images(content: torch.Tensor, style: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Content at the output size; style scaled so its longest side is `size` too ([3, H, W], 0..255)."""
    c = resize(content.float(), output_size(int(content.shape[-2]), int(content.shape[-1]), size)).clamp(0.0, 255.0)
    s = resize(style.float(), output_size(int(style.shape[-2]), int(style.shape[-1]), size)).clamp(0.0, 255.0)
    return c, s


def start_image(content: torch.Tensor, settings: StyleSettings) -> torch.Tensor:
    """The image the optimisation starts from: the (prepared) content image, or seeded uniform noise."""
    if settings.init == "noise":
        g = torch.Generator().manual_seed(settings.seed)
        return (torch.rand(content.shape, generator=g) * 255.0).to(content.device)
    return content.clone()


@torch.no_grad()
def make_targets(model: nn.Module, space: PixelSpace, content: torch.Tensor, style: torch.Tensor,
                 settings: StyleSettings) -> StyleTargets:
    """Targets from the prepared content and style images, by plain forwards."""
    cf = layer_features(model, content[None], settings.layers, space, field="content_layer")
    sf = layer_features(model, style[None], settings.style_layers, space, field="style_layers")
    return targets_from_features(settings, {k: v[0] for k, v in sf.items()}, {k: v[0] for k, v in cf.items()})


def start(model: nn.Module, space: PixelSpace, content: torch.Tensor, style: torch.Tensor,
          settings: StyleSettings) -> StyleJob:
    """A job from raw content and style images ([3, H, W], 0..255)."""
    c, s = prepare_images(content, style, settings.size)
    targets = make_targets(model, space, c, s, settings)
    return StyleJob(settings, targets, start_image(c, settings), mean=space.mean, std=space.std)


def transfer(model: nn.Module, space: PixelSpace, content: torch.Tensor, style: torch.Tensor,
             settings: StyleSettings) -> StyleJob:
    """Run one style transfer alone to the end (the service steps many together through the scheduler)."""
    job = start(model, space, content, style, settings)
    while not job.done:
        run_step(model, [job])
    return job
