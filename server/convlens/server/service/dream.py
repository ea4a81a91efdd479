"""Dream: DeepDream of the caller's image at a layer, stepped together with other callers' dreams.

Validation and decoding happen before the job is admitted (bad requests never take a job slot); the
job's steps then go through the step scheduler, which batches the steps of every live dream of the same
layer and image size (each octave has its own size).
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import torch
from PIL import Image

from convlens.server.compute.dream import GuidePayload, ScorePayload, compute_guides, compute_scores
from convlens.server.engine.optimize.dream import (
    DreamJob,
    DreamSettings,
    fit_size,
    guide_objective,
    l2_objective,
    resize,
    validate,
)
from convlens.server.errors import InvalidArgument, Violations
from convlens.server.models.model import ServedModel
from convlens.server.service.images import ImageInput
from convlens.server.service.streaming import (
    Progress,
    StreamingJobService,
    caller_pixels,
    check_preview_every,
    given_or,
    off_loop,
    picture,
)

# The default dream layer per model, chosen by looking (docs/quality.md): Lite0's last stride-16 block
# dreams eyes, noses and fur, the object parts google/deepdream's inception_4c is known for; the stride-8
# blocks and the first stride-16 ones dream stripes and spots.
DEFAULT_LAYERS = {"efficientnet_lite0": "_blocks.10"}
# Steps per octave where google/deepdream's 10 are not enough: Lite0's block outputs (a residual stream after
# a linear projection, not a ReLU output like inception_4c/output) carry a large baseline energy, and 10 steps
# raised the objective only 2.4-2.7x on the embedded photos, 20 only 2.95-3.65x (coffee short); 30 raise it
# 3.4-3.8x, and by eye still dream rather than overpaint (40: 3.7-4.1x, faces everywhere; docs/quality.md).
DEFAULT_STEPS_PER_OCTAVE = {"efficientnet_lite0": 30}


def default_layer(model: ServedModel) -> str:
    """The model's dream layer: from the table, else its last stride-16 block (`_blocks.N` of the
    EfficientNet-Lite family), else the middle stride-16 map layer of its catalog."""
    if model.name in DEFAULT_LAYERS and DEFAULT_LAYERS[model.name] in model.layer_index:
        return DEFAULT_LAYERS[model.name]
    maps = [s for s in model.layers if len(s.output_shape) == 3 and s.receptive_field is not None]
    blocks = [s.name for s in maps if s.receptive_field and s.receptive_field.jump_y == 16
              and s.name.startswith("_blocks.") and s.name.count(".") == 1]
    if blocks:
        return blocks[-1]
    for jump in (16, 8, 32, 4):
        candidates = [s.name for s in maps if s.receptive_field and s.receptive_field.jump_y == jump]
        if candidates:
            return candidates[len(candidates) // 2]
    raise InvalidArgument(f"model {model.name!r} has no convolutional map layer to dream at; name one",
                          field="layer")


@dataclass
class DreamQuery:
    model: str
    image: ImageInput | None
    layer: str | None = None
    channel: int | None = None
    octaves: int | None = None
    octave_scale: float | None = None
    steps_per_octave: int | None = None
    step_size: float | None = None
    jitter: int | None = None
    guide: ImageInput | None = None
    seed: int | None = None  # None: a random one (reported in the settings)
    preview_every: int = 0
    max_size: int | None = None


@dataclass
class DreamAnswer:
    image: Image.Image
    objective: float  # on the dream, by a plain forward pass
    input_objective: float  # on the input at the same size
    settings: DreamSettings  # as used (octaves kept)
    guided: bool


class DreamService(StreamingJobService):
    rpc = "Dream"

    def settings(self, model: ServedModel, q: DreamQuery, violations: Violations | None = None) -> DreamSettings:
        """The request's settings with defaults filled in, validated: InvalidArgument naming every bad field
        (added to `violations` instead when given)."""
        v = Violations() if violations is None else violations
        d = DreamSettings(layer="")
        layer = q.layer or v.collect(default_layer, model) or ""
        # An unknown layer is collected like StyleTransfer's layers: NOT_FOUND, naming every bad field.
        spec = v.collect(model.layer, layer, field_name="layer") if layer else None
        channels = spec.output_shape[0] if spec is not None and v.check(
            len(spec.output_shape) == 3, "layer", f"layer {layer!r} outputs shape {spec.output_shape} per image, "
            "not a (C, H, W) map; dream at a convolutional layer") else None
        settings = replace(
            d, layer=layer, channel=q.channel, octaves=given_or(q.octaves, d.octaves),
            octave_scale=given_or(q.octave_scale, d.octave_scale),
            steps_per_octave=given_or(q.steps_per_octave, DEFAULT_STEPS_PER_OCTAVE.get(model.name, d.steps_per_octave)),
            step_size=given_or(q.step_size, d.step_size), jitter=given_or(q.jitter, d.jitter),
            max_size=given_or(q.max_size, d.max_size),
            seed=secrets.randbits(31) if q.seed is None else q.seed)  # a random seed is reported back
        validate(settings, layer_channels=channels, guided=q.guide is not None, violations=v)
        if violations is None:
            v.raise_if_any()
        return settings

    async def __call__(self, query: DreamQuery, deadline: float | None) -> AsyncIterator[Progress | DreamAnswer]:
        model = self.gradient_model(query.model)
        violations = Violations()
        if query.image is None:
            violations.add("image", "image is required: encoded PNG/JPEG/WebP bytes or a raw tensor")
        settings = self.settings(model, query, violations)
        check_preview_every(query.preview_every, violations)
        violations.raise_if_any()
        source = query.image
        assert source is not None  # refused above
        image = await off_loop(lambda: caller_pixels(source, "image"))
        h, w = fit_size(int(image.shape[-2]), int(image.shape[-1]), settings.max_size)
        cost = self.check_budget(h * w, f"the image dreamed at {w}x{h} (its largest octave)", ("max_size",))
        guide_input = query.guide
        guide = None if guide_input is None else await off_loop(lambda: caller_pixels(guide_input, "guide"))
        async with self.job(model, deadline, cost) as handle:
            objective = l2_objective(settings.channel)
            if guide is not None:
                side = max(h, w)
                features = await handle.submit(("dream-guide", settings.layer, tuple(guide.shape), side),
                                               GuidePayload(guide, settings.layer, side), compute_guides)
                objective = guide_objective(features)
            pre, device, chosen = model.preprocess, handle.device, objective
            # The octave bases are resized here: off the event loop, as every streaming job is built.
            job = await off_loop(lambda: DreamJob(image.to(device), settings, chosen, mean=pre.mean, std=pre.std,
                                                  device=device))
            async for event in self.progress(handle, job, query.preview_every, lambda: picture(job.picture())):
                yield event
            final, before = await off_loop(lambda: _final_and_input(job))
            scores = await handle.submit(("dream-score", settings.layer, tuple(final.shape)),
                                         ScorePayload(before, final, settings.layer, objective), compute_scores)
        image_out = await off_loop(lambda: picture(final))
        yield DreamAnswer(image_out, objective=scores[1], input_objective=scores[0], settings=job.settings,
                          guided=guide is not None)


def _final_and_input(job: DreamJob) -> tuple[torch.Tensor, torch.Tensor]:
    """The dream, and the input at the dream's size (its last octave's base): what the objective is compared on."""
    final = job.picture()
    return final, resize(job.bases[-1], (int(final.shape[-2]), int(final.shape[-1])))
