"""StyleTransfer messages."""

from __future__ import annotations

from convlens.server.engine.optimize import style
from convlens.server.service.streaming import Progress
from convlens.server.service.style import StyleAnswer, StyleQuery
from convlens.server.transport.codecs.common import enum, given, optional_image, png, progress
from convlens.server.transport.codecs.vocabulary import enum_names, enum_values
from convlens.v1 import convlens_pb2 as pb

OPTIMIZERS = enum_names(pb.Optimizer, style.OPTIMIZERS, unspecified="adam")
SOFTEN = enum_names(pb.Soften, style.SOFTEN, unspecified=None)  # UNSPECIFIED: the deprecated bool, else the default
GRAMS = enum_names(pb.GramNormalization, style.GRAM_NORMALIZATIONS, unspecified="positions")
INITS = enum_names(pb.StyleInit, style.INITS, unspecified="content")
DISTANCES = enum_names(pb.StyleDistance, style.STYLE_DISTANCES, unspecified=None)  # UNSPECIFIED: the model's default
VALUES = {table_name: enum_values(table) for table_name, table in
          (("optimizer", OPTIMIZERS), ("soften", SOFTEN), ("gram_normalization", GRAMS), ("init", INITS),
           ("style_distance", DISTANCES))}


def _soften(request: pb.StyleTransferRequest) -> str | None:
    if request.soften_mode == pb.SOFTEN_UNSPECIFIED:
        return "channels" if request.soften else None  # the deprecated bool; None: the model's default
    return enum(SOFTEN, request.soften_mode, "soften_mode", "Soften")


def query(request: pb.StyleTransferRequest) -> StyleQuery:
    """Unset optional numbers mean the defaults (None); set ones, 0 included, go to the service, which
    validates the ranges."""
    return StyleQuery(
        model=request.model,
        content=optional_image(request, "content"),
        style=optional_image(request, "style"),
        style_layers=tuple(request.style_layers),
        style_layer_weights=tuple(float(w) for w in request.style_layer_weights),
        content_layer=request.content_layer or None,
        style_weight=request.style_weight if request.HasField("style_weight") else None,
        content_weight=request.content_weight if request.HasField("content_weight") else None,
        steps=given(request, "steps"),
        size=given(request, "size"),
        optimizer=enum(OPTIMIZERS, request.optimizer, "optimizer", "Optimizer"),
        soften=_soften(request),
        temperature=request.temperature if request.HasField("temperature") else None,
        gram_normalization=enum(GRAMS, request.gram_normalization, "gram_normalization", "GramNormalization"),
        init=enum(INITS, request.init, "init", "StyleInit"),
        learning_rate=request.learning_rate if request.HasField("learning_rate") else None,
        style_distance=(None if request.style_distance == pb.STYLE_DISTANCE_UNSPECIFIED
                        else enum(DISTANCES, request.style_distance, "style_distance", "StyleDistance")),
        seed=given(request, "seed"),
        preview_every=int(request.preview_every),
    )


def response(event: Progress | StyleAnswer) -> pb.StyleTransferResponse:
    if isinstance(event, Progress):
        return pb.StyleTransferResponse(progress=progress(event))
    s = event.settings
    settings = pb.StyleTransferSettings(
        style_layers=list(s.style_layers), style_layer_weights=list(s.layer_weights), content_layer=s.content_layer,
        style_weight=s.style_weight, content_weight=s.content_weight, steps=s.steps, size=s.size,
        optimizer=VALUES["optimizer"][s.optimizer], soften=VALUES["soften"][s.soften], temperature=s.temperature,
        gram_normalization=VALUES["gram_normalization"][s.gram_normalization], init=VALUES["init"][s.init],
        learning_rate=s.learning_rate, seed=s.seed, height=event.image.height, width=event.image.width,
        style_distance=VALUES["style_distance"][s.style_distance])
    return pb.StyleTransferResponse(result=pb.StyleTransferResult(
        image_png=png(event.image), style_loss=event.losses.get("style", 0.0),
        content_loss=event.losses.get("content", 0.0), total_loss=event.losses.get("total", 0.0),
        initial_style_loss=event.initial_style_loss, settings=settings))
