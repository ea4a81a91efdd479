"""StyleTransfer: Gatys style transfer of the caller's content image toward a style image.

Adam jobs (the default) are stepped together with every other live transfer of the same output size and
layers; an L-BFGS job runs alone. Validation and decoding happen before the job is admitted.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass

from PIL import Image

from convlens.server.compute.style import TargetsPayload, compute_targets
from convlens.server.engine.optimize.style import (
    StyleJob,
    StyleSettings,
    output_size,
    prepare_images,
    start_image,
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


@dataclass(frozen=True)
class StyleDefaults:
    """A model's defaults, chosen by the numbers and by eye (docs/quality.md)."""

    style_layers: tuple[str, ...]
    content_layer: str
    style_weight: float = 1e4
    soften: str = "none"
    temperature: float = 1.0
    learning_rate: float = 2.0
    style_distance: str = "mse"


# EfficientNet-Lite0: the stem, the last block of each stride up to 16 and a middle stride-16 one for style,
# the last stride-16 block for content; raw features with the relative style distance (each layer's
# ||G - G_style||^2 / ||G_style||^2): judged by a second network (Lite2's Grams) the results come 2-2.9x closer
# to the texture styles, where Wang et al.'s softened features (channels, T 4), matched 98% by Lite0 itself,
# came only 1.3-1.6x closer; the cat stays a cat, in brick courses (docs/quality.md).
_LITE = StyleDefaults(style_layers=("_act0", "_blocks.0", "_blocks.2", "_blocks.4", "_blocks.7", "_blocks.10"),
                      content_layer="_blocks.10", style_weight=50.0, soften="none", style_distance="relative")
DEFAULTS = {"efficientnet_lite0": _LITE}


def defaults_for(model: ServedModel) -> StyleDefaults:
    """From the table, else from the catalog: the first map layer of each stride 2..16 for style, the
    last stride-16 (or deepest up to 16) map layer for content."""
    known = DEFAULTS.get(model.name)
    if known is not None and all(name in model.layer_index for name in (*known.style_layers, known.content_layer)):
        return known
    maps = [s for s in model.layers if len(s.output_shape) == 3 and s.receptive_field is not None]
    by_jump: dict[int, list[str]] = {}
    for s in maps:
        by_jump.setdefault(s.receptive_field.jump_y, []).append(s.name)  # type: ignore[union-attr]
    style = tuple(by_jump[j][0] for j in (2, 4, 8, 16) if j in by_jump)
    deep = [j for j in sorted(by_jump) if j <= 16]
    if not style or not deep:
        raise InvalidArgument(f"model {model.name!r} has no convolutional map layers to take styles from; name "
                              "style_layers and content_layer", field="style_layers")
    return StyleDefaults(style_layers=style, content_layer=by_jump[deep[-1]][-1])


@dataclass
class StyleQuery:
    model: str
    content: ImageInput | None
    style: ImageInput | None
    style_layers: tuple[str, ...] = ()
    style_layer_weights: tuple[float, ...] = ()
    content_layer: str | None = None
    style_weight: float | None = None
    content_weight: float | None = None
    steps: int | None = None
    size: int | None = None
    optimizer: str | None = None
    soften: str | None = None
    temperature: float | None = None
    gram_normalization: str | None = None
    init: str | None = None
    learning_rate: float | None = None
    style_distance: str | None = None
    seed: int | None = None  # None: a random one (reported in the settings)
    preview_every: int = 0


@dataclass
class StyleAnswer:
    image: Image.Image
    losses: dict[str, float]  # style, content, total at the last step
    initial_style_loss: float  # at the first step
    settings: StyleSettings  # as used


class StyleService(StreamingJobService):
    rpc = "StyleTransfer"

    def settings(self, model: ServedModel, q: StyleQuery, violations: Violations | None = None) -> StyleSettings:
        """The request's settings with the model's defaults filled in, validated: InvalidArgument naming every
        bad field (added to `violations` instead when given)."""
        v = Violations() if violations is None else violations
        d = defaults_for(model)
        base = StyleSettings(style_layers=d.style_layers, content_layer=d.content_layer)
        settings = StyleSettings(
            style_layers=tuple(q.style_layers) or d.style_layers,
            content_layer=q.content_layer or d.content_layer,
            style_layer_weights=tuple(q.style_layer_weights),
            style_weight=float(given_or(q.style_weight, d.style_weight)),
            content_weight=float(given_or(q.content_weight, base.content_weight)),
            steps=int(given_or(q.steps, base.steps)), size=int(given_or(q.size, base.size)),
            init=q.init or base.init,
            optimizer=q.optimizer or base.optimizer,
            learning_rate=float(given_or(q.learning_rate, d.learning_rate)),
            soften=q.soften or d.soften, temperature=float(given_or(q.temperature, d.temperature)),
            gram_normalization=q.gram_normalization or base.gram_normalization,
            style_distance=q.style_distance or d.style_distance,
            seed=secrets.randbits(31) if q.seed is None else q.seed)  # a random seed is reported back
        validate(settings, v)
        for name in settings.style_layers:
            v.collect(self._map_layer, model, name, "style_layers")
        v.collect(self._map_layer, model, settings.content_layer, "content_layer")
        if violations is None:
            v.raise_if_any()
        return settings

    @staticmethod
    def _map_layer(model: ServedModel, name: str, field: str) -> None:
        spec = model.layer(name, field_name=field)
        if len(spec.output_shape) != 3:
            raise InvalidArgument(f"layer {name!r} outputs shape {spec.output_shape} per image, not a (C, H, W) "
                                  "map; Gram matrices need a convolutional layer", field=field)

    async def __call__(self, query: StyleQuery, deadline: float | None) -> AsyncIterator[Progress | StyleAnswer]:
        model = self.gradient_model(query.model)
        violations = Violations()
        for name, image in (("content", query.content), ("style", query.style)):
            if image is None:
                violations.add(name, f"{name} is required: encoded PNG/JPEG/WebP bytes or a raw tensor")
        settings = self.settings(model, query, violations)
        check_preview_every(query.preview_every, violations)
        violations.raise_if_any()
        content_input, style_input = query.content, query.style
        assert content_input is not None and style_input is not None  # refused above
        content = await off_loop(lambda: caller_pixels(content_input, "content"))
        style = await off_loop(lambda: caller_pixels(style_input, "style"))
        h, w = output_size(int(content.shape[-2]), int(content.shape[-1]), settings.size)
        cost = self.check_budget(h * w, f"the output at {w}x{h}", ("size",))
        content, style = await off_loop(lambda: prepare_images(content, style, settings.size))
        async with self.job(model, deadline, cost) as handle:
            targets = await handle.submit(("style-targets", tuple(content.shape), tuple(style.shape)),
                                          TargetsPayload(content, style, settings), compute_targets)
            pre, device = model.preprocess, handle.device
            # The start image (noise or the content, resized) is made here: off the event loop, as every
            # streaming job is built.
            job = await off_loop(lambda: StyleJob(settings, targets, start_image(content, settings).to(device),
                                                  mean=pre.mean, std=pre.std))
            initial = float("nan")
            async for event in self.progress(handle, job, query.preview_every, lambda: picture(job.picture())):
                if event.step == 1:
                    initial = event.terms["style"]
                yield event
            image = await off_loop(lambda: picture(job.picture()))
            losses = dict(job.losses)
        yield StyleAnswer(image, losses, initial, settings)
