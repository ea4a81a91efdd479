"""Gatys et al. style transfer: an image whose Gram matrices match a style image's and whose features at
one deeper layer match a content image's.

    G(f)_km   = sum_p f_k(p) f_m(p) / norm           f: one layer's [C, H, W] features, p: positions
    L_style   = sum_l w_l * mean_km (G(f_l(x)) - G(f_l(style)))^2
    L_content = mean (f_c(x) - f_c(content))^2
    L         = style_weight * L_style + content_weight * L_content

Gram normalisation: "positions" divides by H*W (the expectation over positions Gatys writes; independent
of the image size), "elements" by C*H*W (the PyTorch tutorial's a*b*c*d with one image), "none" by 1.

Softening (Wang et al., CVPR 2021): residual networks' features are peaky (low entropy) and make the Gram
match weak; a softmax transform of the features before the Gram and content losses fixes it. Variants:
"channels" (softmax over channels at each position, their code's Softmax2d), "positions" (softmax over the
positions of each channel), "all" (softmax over every C*H*W activation of the layer, the other alternative
in their code), each at a temperature, and rescaled by the number of entries so the mean is 1 (then the
weights mean the same with and without softening).

Optimisers: Adam (default) is per job and element-wise, so a job's steps can be batched with other jobs'
(`style_step`) and give the same image alone or batched. L-BFGS (the tutorial's) keeps a history over the
whole image and runs alone (`StyleState.lbfgs_step`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from convlens.server.engine.dream import resize
from convlens.server.engine.layer_features import PixelSpace, layer_features
from convlens.server.errors import InvalidArgument

SOFTEN = ("none", "channels", "positions", "all")
GRAM_NORMALIZATIONS = ("positions", "elements", "none")
INITS = ("content", "noise")
OPTIMIZERS = ("adam", "lbfgs")

MAX_STEPS = 2000
MAX_SIDE = 1024
MIN_SIDE = 32
MAX_STYLE_LAYERS = 16
ADAM_EPS_FRACTION = 1e-3  # Adam's eps, relative to the job's first mean |gradient| (see StyleState.apply)


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
    seed: int = 0

    @property
    def layer_weights(self) -> tuple[float, ...]:
        return self.style_layer_weights or (1.0,) * len(self.style_layers)

    @property
    def layers(self) -> tuple[str, ...]:
        """Every layer read, style layers first, without repeats."""
        return tuple(dict.fromkeys((*self.style_layers, self.content_layer)))


def validate(s: StyleSettings) -> None:
    """Raise InvalidArgument naming the proto field of the first setting out of range."""
    if not s.style_layers:
        raise InvalidArgument("style_layers is empty: name at least one layer", field="style_layers")
    if len(s.style_layers) > MAX_STYLE_LAYERS:
        raise InvalidArgument(f"{len(s.style_layers)} style layers; at most {MAX_STYLE_LAYERS}",
                              field="style_layers")
    if s.style_layer_weights and len(s.style_layer_weights) != len(s.style_layers):
        raise InvalidArgument(f"style_layer_weights has {len(s.style_layer_weights)} entries for "
                              f"{len(s.style_layers)} style layers; give one per layer or none",
                              field="style_layer_weights")
    if any(not w >= 0 for w in s.style_layer_weights):
        raise InvalidArgument("style_layer_weights must be non-negative", field="style_layer_weights")
    for name, value in (("style_weight", s.style_weight), ("content_weight", s.content_weight)):
        if not 0 <= value < float("inf"):
            raise InvalidArgument(f"{name} = {value} must be a finite non-negative number", field=name)
    if not 1 <= s.steps <= MAX_STEPS:
        raise InvalidArgument(f"steps = {s.steps} is out of range (1..{MAX_STEPS})", field="steps")
    if not MIN_SIDE <= s.size <= MAX_SIDE:
        raise InvalidArgument(f"size = {s.size} is out of range ({MIN_SIDE}..{MAX_SIDE})", field="size")
    if s.init not in INITS:
        raise InvalidArgument(f"unknown init {s.init!r}; use one of {', '.join(INITS)}", field="init")
    if s.optimizer not in OPTIMIZERS:
        raise InvalidArgument(f"unknown optimizer {s.optimizer!r}; use one of {', '.join(OPTIMIZERS)}",
                              field="optimizer")
    if not 0 < s.learning_rate <= 255:
        raise InvalidArgument(f"learning_rate = {s.learning_rate} is out of range (above 0, at most 255 on the "
                              "0..255 pixel scale)", field="learning_rate")
    if s.soften not in SOFTEN:
        raise InvalidArgument(f"unknown soften {s.soften!r}; use one of {', '.join(SOFTEN)}", field="soften")
    if not 1e-3 <= s.temperature <= 1e3:
        raise InvalidArgument(f"temperature = {s.temperature} is out of range (0.001..1000)", field="temperature")
    if s.gram_normalization not in GRAM_NORMALIZATIONS:
        raise InvalidArgument(f"unknown gram_normalization {s.gram_normalization!r}; use one of "
                              f"{', '.join(GRAM_NORMALIZATIONS)}", field="gram_normalization")


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
        style = style + w * (g - targets.grams[layer]).pow(2).mean()
    content = (soften(features[s.content_layer], s.soften, s.temperature) - targets.content).pow(2).mean()
    return {"style": style, "content": content, "total": s.style_weight * style + s.content_weight * content}


# ---------------------------------------------------------------- one job's state


@dataclass
class StyleState:
    """One style transfer in progress: its image (the optimised leaf), optimiser, targets, step count."""

    settings: StyleSettings
    targets: StyleTargets
    image: torch.Tensor  # [3, H, W] 0..255, a leaf requiring grad
    optimizer: torch.optim.Optimizer
    step: int = 0
    losses: dict[str, float] = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int]:
        return int(self.image.shape[-2]), int(self.image.shape[-1])

    @property
    def done(self) -> bool:
        return self.step >= self.settings.steps

    def apply(self, losses: Mapping[str, torch.Tensor]) -> None:
        """After `image.grad` was filled: one Adam step, clip to valid pixels, record the losses.

        Adam divides each pixel's step by its own gradient's size, so a pixel whose gradient is ~0 (a content
        start has no content gradient; saturated units pass none) would move by ±lr on rounding noise alone,
        and a job would not give the same image alone and batched (batched convolutions round differently).
        Its eps is therefore set, at the first step, to ADAM_EPS_FRACTION of the job's mean |gradient|: such
        pixels stay still, and the step stays independent of the loss weights' scale.
        """
        if self.step == 0 and isinstance(self.optimizer, torch.optim.Adam) and self.image.grad is not None:
            scale = float(self.image.grad.abs().mean())
            self.optimizer.param_groups[0]["eps"] = max(ADAM_EPS_FRACTION * scale, 1e-12)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.image.clamp_(0.0, 255.0)
        self.losses = {k: float(v) for k, v in losses.items()}
        self.step += 1

    def picture(self) -> torch.Tensor:
        """The current image, [3, H, W] in 0..255 (L-BFGS may stray outside during the run)."""
        return self.image.detach().clamp(0.0, 255.0)

    def lbfgs_step(self, model: nn.Module, space: PixelSpace) -> None:
        """One L-BFGS iteration with a strong-Wolfe line search (this job alone).

        Not clamped between iterations: clipping moves the point under the line search and the curvature
        history (measured: with clamping it stalled on a loss 100x higher); `picture()` clips the result.
        """
        last: dict[str, torch.Tensor] = {}

        def closure() -> torch.Tensor:
            self.optimizer.zero_grad(set_to_none=True)
            feats = layer_features(model, self.image[None], self.settings.layers, space)
            terms = loss_terms(self.settings, self.targets, {k: v[0] for k, v in feats.items()})
            (self.image.grad,) = torch.autograd.grad(terms["total"], [self.image])
            last.update({k: v.detach() for k, v in terms.items()})
            return terms["total"]

        self.optimizer.step(closure)  # type: ignore[arg-type]
        self.losses = {k: float(v) for k, v in last.items()}
        self.step += 1


def output_size(height: int, width: int, size: int) -> tuple[int, int]:
    """The content image's (height, width) scaled so the longest side is `size` (up or down)."""
    scale = size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def prepare_images(content: torch.Tensor, style: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Content at the output size; style scaled so its longest side is `size` too ([3, H, W], 0..255)."""
    c = resize(content.float(), output_size(*content.shape[-2:], size)).clamp(0.0, 255.0)
    s = resize(style.float(), output_size(*style.shape[-2:], size)).clamp(0.0, 255.0)
    return c, s


def start(model: nn.Module, space: PixelSpace, content: torch.Tensor, style: torch.Tensor,
          settings: StyleSettings) -> StyleState:
    """A job: targets from the content and style images ([3, H, W], 0..255), the start image, its optimiser."""
    c, s = prepare_images(content, style, settings.size)
    with torch.no_grad():
        cf = layer_features(model, c[None], settings.layers, space, field="content_layer")
        sf = layer_features(model, s[None], settings.style_layers, space, field="style_layers")
    targets = targets_from_features(settings, {k: v[0] for k, v in sf.items()}, {k: v[0] for k, v in cf.items()})
    if settings.init == "noise":
        g = torch.Generator().manual_seed(settings.seed)
        image = (torch.rand(c.shape, generator=g) * 255.0).to(c.device)
    else:
        image = c.clone()
    image.requires_grad_(True)
    optimizer: torch.optim.Optimizer
    if settings.optimizer == "lbfgs":
        optimizer = torch.optim.LBFGS([image], lr=1.0, max_iter=1, history_size=100, line_search_fn="strong_wolfe")
    else:
        optimizer = torch.optim.Adam([image], lr=settings.learning_rate)
    return StyleState(settings, targets, image, optimizer)


def style_step(model: nn.Module, space: PixelSpace, states: Sequence[StyleState]) -> None:
    """One Adam step for every state (same size; any layers): one forward and backward for all."""
    if not states:
        return
    if any(s.size != states[0].size for s in states):
        raise ValueError("style_step needs states of one size")
    layers = tuple(dict.fromkeys(layer for s in states for layer in s.settings.layers))
    batch = torch.stack([s.image for s in states])  # differentiable to each job's own leaf
    feats = layer_features(model, batch, layers, space)
    terms = [loss_terms(s.settings, s.targets, {k: v[i] for k, v in feats.items()}) for i, s in enumerate(states)]
    # autograd.grad, not backward(): nothing accumulates in the (shared) model's parameters.
    grads = torch.autograd.grad(torch.stack([t["total"] for t in terms]).sum(), [s.image for s in states])
    for s, t, g in zip(states, terms, grads, strict=True):
        s.image.grad = g
        s.apply({k: v.detach() for k, v in t.items()})


def transfer(model: nn.Module, space: PixelSpace, content: torch.Tensor, style: torch.Tensor,
             settings: StyleSettings, *, on_step: Callable[[StyleState], None] | None = None) -> StyleState:
    """Run one style transfer alone to the end."""
    state = start(model, space, content, style, settings)
    while not state.done:
        if settings.optimizer == "lbfgs":
            state.lbfgs_step(model, space)
        else:
            style_step(model, space, [state])
        if on_step is not None:
            on_step(state)
    return state
