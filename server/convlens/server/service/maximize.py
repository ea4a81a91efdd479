"""MaximizeUnit: an image optimised to excite a class logit or a unit, stepped by the step scheduler.

The call yields a `Progress` per step (with a preview every `preview_every` steps if asked), then
one `MaximizeAnswer`: the image, the objective on it (no random transforms), the model's top-5 on it, and
every setting used (with `images` > 1: each image's own, and their Gram similarity at the diversity
layer). Validation happens before the job is admitted, so bad input never takes a job slot.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from PIL import Image

from convlens.server.compute.maximize import compute_evaluation
from convlens.server.engine.layers import LayerResolver
from convlens.server.engine.optimize.maximize import (
    MaximizeJob,
    MaximizeSettings,
)
from convlens.server.engine.optimize.objectives import (
    ChannelMax,
    ChannelMean,
    ClassLogit,
    Objective,
    UnitActivation,
)
from convlens.server.engine.predictions import Prediction, top_k
from convlens.server.engine.targets import ClassTarget, Target, validate_target
from convlens.server.errors import InvalidArgument, Violations
from convlens.server.service.streaming import Progress, StreamingJobService, check_preview_every, off_loop

RPC = "MaximizeUnit"


@dataclass
class MaximizeQuery:
    model: str
    target: Target | None
    preset: str | None = None  # None: lucid
    overrides: dict[str, Any] = field(default_factory=dict)  # MaximizeSettings fields; None = the preset's
    preview_every: int = 0


@dataclass
class MaximizeImage:
    image: Image.Image
    objective: float
    predictions: list[Prediction]


@dataclass
class MaximizeAnswer:
    image: Image.Image
    objective: float
    predictions: list[Prediction]
    settings: MaximizeSettings
    target: Target
    images: list[MaximizeImage] = field(default_factory=list)  # all of them, when the job had several
    gram_similarity: float = 0.0


def objective_for(target: Target) -> Objective:
    if isinstance(target, ClassTarget):
        return ClassLogit(target.index)
    if target.y is not None and target.x is not None:
        return UnitActivation(target.layer, target.channel, target.y, target.x)
    return ChannelMax(target.layer, target.channel) if target.reduction == "max" else \
        ChannelMean(target.layer, target.channel)


def diversity_layer(settings: MaximizeSettings, target: Target, layers: LayerResolver) -> MaximizeSettings:
    """Settle where the Gram matrices of a several-image job are taken: the caller's layer, else the
    target's. Checked: a layer with channels; diversity needs at least two images."""
    if settings.diversity > 0 and settings.images < 2:
        raise InvalidArgument(f"diversity = {settings.diversity:g} needs images >= 2 (got {settings.images}): "
                              "it compares the job's images with each other", field="images")
    if settings.images < 2:
        return replace(settings, diversity_layer="")
    layer = settings.diversity_layer or ("" if isinstance(target, ClassTarget) else target.layer)
    if not layer:
        if settings.diversity > 0:
            raise InvalidArgument("a class target has no layer: set diversity_layer for the diversity "
                                  "objective", field="diversity_layer")
        return settings
    shape = layers.output_shape(layer, field="diversity_layer")
    if shape is not None and len(shape) != 3:
        raise InvalidArgument(f"diversity_layer {layer!r} outputs {tuple(shape)} per image; the diversity "
                              "objective needs a layer with channels and positions (C, H, W)",
                              field="diversity_layer")
    return replace(settings, diversity_layer=layer)


def resolve_settings(query: MaximizeQuery) -> MaximizeSettings:
    """The preset with the caller's overrides, each checked (one INVALID_ARGUMENT naming every bad field)."""
    overrides = dict(query.overrides)
    if overrides.get("seed") is None:
        overrides["seed"] = secrets.randbits(31)  # reported in the settings, so the image is reproducible
    violations = Violations()
    check_preview_every(query.preview_every, violations)
    settings = MaximizeSettings.checked(query.preset, violations, **overrides)
    return settings


class MaximizeService(StreamingJobService):
    rpc = RPC
    preview_last = True

    async def __call__(self, query: MaximizeQuery, deadline: float | None) -> AsyncIterator[Progress | MaximizeAnswer]:
        model = self.gradient_model(query.model)
        v = Violations()  # every bad field at once: the target's and the settings' (an unknown layer: NOT_FOUND)
        if query.target is None:
            v.add("target", "target is required: a class_index or a unit")
        else:
            v.collect(validate_target, model.resolver, query.target, num_classes=model.num_classes)
        resolved = v.collect(resolve_settings, query)
        v.raise_if_any()
        assert isinstance(resolved, MaximizeSettings) and query.target is not None
        settings = diversity_layer(resolved, query.target, model.resolver)
        objective = objective_for(query.target)
        cost = self.check_budget(settings.size ** 2 * settings.images,
                          f"size^2 x images = {settings.size}^2 x {settings.images}", ("size", "images"))
        pre = model.preprocess
        async with self.job(model, deadline, cost) as handle:
            device = handle.device
            job = await off_loop(lambda: MaximizeJob(settings, objective, mean=pre.mean, std=pre.std, device=device))
            async for event in self.progress(handle, job, query.preview_every,
                                             lambda: Image.fromarray(job.image_uint8())):
                yield event
            key = ("evaluate", settings.size, tuple(sorted(job.layers)))
            evaluation = await handle.submit(key, job, compute_evaluation)
        image = await off_loop(lambda: Image.fromarray(job.image_uint8()))
        images = await off_loop(lambda: [
            MaximizeImage(Image.fromarray(job.image_uint8(i)), value, top_k(logits, model.labels, 5))
            for i, (value, logits) in enumerate(evaluation.images)])
        yield MaximizeAnswer(image, evaluation.objective, top_k(evaluation.logits, model.labels, 5), settings,
                             query.target, images, evaluation.gram_similarity)
