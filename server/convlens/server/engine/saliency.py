"""Saliency: which input pixels a target (class logit, unit, channel) depends on, for a batch of images.

Methods: the signed gradient; guided backprop and deconvnet (relu_rules.py, covering every ReLU-family
activation); SmoothGrad (smoothgrad.py); integrated gradients (integrated_gradients.py); Grad-CAM and
guided Grad-CAM (grad_cam.py). Every sample carries its own target, and its result does not depend on
its batch companions (the model runs in eval mode for the call; its train/eval flags are restored).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from convlens.server.engine.grad_cam import cam_from, check_cam_layer, default_cam_layer
from convlens.server.engine.gradients import CHUNK, backprop, evaluate
from convlens.server.engine.hooks import eval_mode
from convlens.server.engine.integrated_gradients import (
    BASELINES,
    black_baseline,
    gaussian_blur,
    integrated_gradients,
)
from convlens.server.engine.layers import LayerResolver, resolver_for
from convlens.server.engine.pixel_space import PixelSpace
from convlens.server.engine.relu_rules import RULES
from convlens.server.engine.smoothgrad import BASES, smoothgrad
from convlens.server.engine.targets import Target
from convlens.server.errors import InvalidArgument, Violations

__all__ = [
    "METHODS", "PixelSpace", "SaliencyOptions", "SaliencyResult", "default_cam_layer", "saliency",
    "validate_options",
]

METHODS = (
    "gradient", "guided_backprop", "deconvnet", "smoothgrad", "integrated_gradients", "grad_cam",
    "guided_grad_cam",
)
MAX_STEPS = 1024
MAX_SAMPLES = 256


@dataclass(frozen=True)
class SaliencyOptions:
    """Hashable: requests with equal options may share one batch."""

    method: str = "gradient"
    smooth_base: str = "gradient"  # smoothgrad's inner method: one of smoothgrad.BASES
    smooth_samples: int = 16
    smooth_noise: float = 0.15  # noise stdev as a fraction of the 0..255 pixel range
    seed: int = 0
    ig_steps: int = 50
    ig_baseline: str = "black"  # black | blurred | image
    ig_blur_sigma: float = 10.0  # in model-input pixels
    cam_layer: str | None = None  # None: default_cam_layer(model)


@dataclass
class SaliencyResult:
    attribution: torch.Tensor  # [C, H, W] float32 cpu, model-input space, signed; [1, H, W] for grad_cam
    heatmap: torch.Tensor  # [H, W] float32 cpu: max over channels of |attribution|; grad_cam: the CAM
    target: Target  # resolved (top-1 class when the caller gave None)
    target_value: float  # on the unperturbed input
    logits: torch.Tensor  # [K] float32 cpu
    modified_activations: int  # ReLU-family activations whose backward was modified, else 0
    notes: list[str] = field(default_factory=list)
    baseline_value: float | None = None  # integrated gradients: the target on the baseline


def validate_options(options: SaliencyOptions) -> None:
    """Raise InvalidArgument naming every bad option's proto field."""
    v = Violations()
    v.check(options.method in METHODS, "method", f"unknown method {options.method!r}; use one of {', '.join(METHODS)}")
    if options.method == "smoothgrad":
        v.check(options.smooth_base in BASES, "smoothgrad.base_method",
                f"SmoothGrad cannot average {options.smooth_base!r}; use one of {', '.join(BASES)}")
        v.check(1 <= options.smooth_samples <= MAX_SAMPLES, "smoothgrad.samples",
                f"smoothgrad.samples = {options.smooth_samples} is out of range (1..{MAX_SAMPLES})")
        v.check(0.0 <= options.smooth_noise <= 1.0, "smoothgrad.noise_level",  # also refuses NaN
                f"smoothgrad.noise_level = {options.smooth_noise} is out of range: a fraction of the "
                "pixel range, 0..1 (0.1-0.2 is typical)")
    if options.method == "integrated_gradients" or (
        options.method == "smoothgrad" and options.smooth_base == "integrated_gradients"
    ):
        v.check(1 <= options.ig_steps <= MAX_STEPS, "integrated_gradients.steps",
                f"integrated_gradients.steps = {options.ig_steps} is out of range (1..{MAX_STEPS})")
        v.check(options.ig_baseline in BASELINES, "integrated_gradients.baseline",
                f"unknown baseline {options.ig_baseline!r}; use one of {', '.join(BASELINES)}")
        v.check(options.ig_baseline != "blurred" or 0.0 < options.ig_blur_sigma <= 1000.0,
                "integrated_gradients.blur_sigma", f"integrated_gradients.blur_sigma = {options.ig_blur_sigma} "
                "is out of range: model-input pixels, > 0 and <= 1000")
    v.raise_if_any()


def saliency(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: Sequence[Target | None],
    options: SaliencyOptions,
    space: PixelSpace,
    *,
    baselines: torch.Tensor | None = None,
    resolver: LayerResolver | None = None,
    chunk: int = CHUNK,
) -> list[SaliencyResult]:
    """One result per sample of `inputs` [B, 3, H, W] (on the model's device); results on the CPU.

    `targets[i]` is sample i's target (None: its top-1 class); kinds may be mixed within a batch.
    `baselines` [B, 3, H, W], in the model-input space, is required for ig_baseline == "image".
    `resolver` is the served model's layer resolver (one is built for a bare module). `chunk`: rows per
    forward/backward (engine/budget.rows_per_chunk bounds it for large inputs).
    """
    validate_options(options)
    if inputs.dim() != 4 or len(targets) != inputs.shape[0]:
        raise ValueError(f"inputs {tuple(inputs.shape)} need one target per sample, got {len(targets)}")
    with eval_mode(model):
        return _saliency(model, inputs, list(targets), options, space, baselines,
                         resolver_for(model, resolver), max(1, chunk))


@dataclass
class _Computed:
    attribution: torch.Tensor  # [B, C, H, W], or [B, 1, H, W] for grad_cam
    logits: torch.Tensor
    values: torch.Tensor
    targets: list[Target]
    modified: int = 0
    notes: list[str] = field(default_factory=list)
    baseline_values: torch.Tensor | None = None  # integrated gradients: the target on each baseline


def _saliency(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: list[Target | None],
    options: SaliencyOptions,
    space: PixelSpace,
    baselines: torch.Tensor | None,
    lookup: LayerResolver,
    chunk: int,
) -> list[SaliencyResult]:
    method = options.method
    if method in ("gradient", "guided_backprop", "deconvnet"):
        bp = backprop(model, inputs, targets, rule=_relu_rule(options), resolver=lookup, chunk=chunk)
        done = _Computed(bp.grads, bp.logits, bp.values, bp.targets, bp.modified, _reused(bp.reused_layers))
    elif method in ("grad_cam", "guided_grad_cam"):
        done = _grad_cam(model, inputs, targets, options, lookup, chunk)
    else:
        done = _integrated(model, inputs, targets, options, space, baselines, lookup, chunk)
    notes = _script_note(model) + done.notes
    rule = _relu_rule(options)
    if rule is not None and done.modified == 0:
        notes.append(f"model has no ReLU-family activations: {rule} equals the plain gradient")
    return _results(done, notes, cam_map=method == "grad_cam")


def _relu_rule(options: SaliencyOptions) -> str | None:
    """The backward rule the ReLU-family activations get for these options (None: the plain one)."""
    if options.method in RULES:
        return options.method
    if options.method == "guided_grad_cam":
        return "guided_backprop"
    if options.method == "smoothgrad" and options.smooth_base in RULES:
        return options.smooth_base
    return None


def _grad_cam(model: nn.Module, inputs: torch.Tensor, targets: list[Target | None],
              options: SaliencyOptions, lookup: LayerResolver, chunk: int) -> _Computed:
    size = (int(inputs.shape[-2]), int(inputs.shape[-1]))
    layer = options.cam_layer or default_cam_layer(model, input_size=size, resolver=lookup)
    check_cam_layer(lookup, layer)
    bp = backprop(model, inputs, targets, layer=layer, resolver=lookup, chunk=chunk)
    cam, (h, w) = cam_from(bp.layer_outputs, bp.layer_grads, layer, size)
    done = _Computed(cam, bp.logits, bp.values, bp.targets, 0, _reused(bp.reused_layers))
    done.notes.insert(0, f"Grad-CAM at layer {layer!r} ({h}x{w} map, upsampled bilinearly)")
    if options.method == "guided_grad_cam":
        # A separate pass: Grad-CAM's layer gradients must come from the plain backward (as Captum).
        guided = backprop(model, inputs, bp.targets, rule="guided_backprop", resolver=lookup, chunk=chunk)
        done.attribution, done.modified = guided.grads * cam, guided.modified
    return done


def _integrated(model: nn.Module, inputs: torch.Tensor, targets: list[Target | None],
                options: SaliencyOptions, space: PixelSpace, baselines: torch.Tensor | None,
                lookup: LayerResolver, chunk: int) -> _Computed:
    """SmoothGrad and integrated gradients: an unperturbed pass for values, then many perturbed ones."""
    logits, values, resolved = evaluate(model, inputs, targets, resolver=lookup, chunk=chunk)
    ig_baselines = None
    if "integrated_gradients" in (options.method, options.smooth_base):
        ig_baselines = _baselines(inputs, options, space, baselines)
    if options.method == "integrated_gradients":
        assert ig_baselines is not None
        attribution = integrated_gradients(model, inputs, resolved, ig_baselines, options.ig_steps,
                                           resolver=lookup, chunk=chunk)
        _, baseline_values, _ = evaluate(model, ig_baselines, resolved, resolver=lookup, chunk=chunk)
        return _Computed(attribution, logits, values, resolved, baseline_values=baseline_values)
    attribution, modified = smoothgrad(
        model, inputs, resolved, base=options.smooth_base, samples=options.smooth_samples,
        noise=options.smooth_noise, std=space.std, seed=options.seed, baselines=ig_baselines,
        steps=options.ig_steps, resolver=lookup, chunk=chunk)
    return _Computed(attribution, logits, values, resolved, modified)


def _reused(layers: set[str]) -> list[str]:
    return [f"layer {name!r} ran more than once per forward pass; its last output was used"
            for name in sorted(layers)]


def _baselines(inputs: torch.Tensor, options: SaliencyOptions, space: PixelSpace,
               baselines: torch.Tensor | None) -> torch.Tensor:
    if options.ig_baseline == "black":
        black: torch.Tensor = black_baseline(inputs, space.mean, space.std)
        return black
    if options.ig_baseline == "blurred":
        blurred: torch.Tensor = gaussian_blur(inputs, options.ig_blur_sigma)
        return blurred
    if baselines is None or baselines.shape != inputs.shape:
        got = "none" if baselines is None else f"shape {tuple(baselines.shape[1:])}"
        raise InvalidArgument(
            f"the image baseline needs a baseline_image the size of the model input "
            f"{tuple(inputs.shape[1:])}; got {got}", field="baseline_image")
    return baselines.to(device=inputs.device, dtype=inputs.dtype)


def _script_note(model: nn.Module) -> list[str]:
    if any(isinstance(m, torch.jit.ScriptModule) for m in model.modules()):
        return ["model contains TorchScript code: ReLU-family activations inside it keep their plain "
                "gradient under guided backprop / deconvnet"]
    return []


def _results(done: _Computed, notes: list[str], *, cam_map: bool) -> list[SaliencyResult]:
    # Contiguous whatever layout the replica computed in: callers read raw bytes off these tensors.
    attribution = done.attribution.detach().float().cpu().contiguous()
    heatmaps = attribution[:, 0] if cam_map else attribution.abs().amax(dim=1)
    logits = done.logits.detach().float().cpu()
    values = done.values.detach().float().cpu().tolist()
    base = None if done.baseline_values is None else done.baseline_values.detach().float().cpu().tolist()
    return [
        SaliencyResult(
            attribution=attribution[i].clone(),
            heatmap=heatmaps[i].clone(),
            target=done.targets[i],
            target_value=float(values[i]),
            logits=logits[i].clone(),
            modified_activations=done.modified,
            notes=list(notes),
            baseline_value=None if base is None else float(base[i]),
        )
        for i in range(attribution.shape[0])
    ]
