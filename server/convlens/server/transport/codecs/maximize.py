"""MaximizeUnit messages: the request's preset and optional knobs in; progress events and the result out."""

from __future__ import annotations

from typing import Any

from convlens.server.engine.optimize import maximize
from convlens.server.engine.optimize.maximize import MaximizeSettings
from convlens.server.service.maximize import MaximizeAnswer, MaximizeQuery
from convlens.server.service.streaming import Progress
from convlens.server.transport.codecs.common import enum, png, prediction, progress, target, target_message
from convlens.server.transport.codecs.vocabulary import enum_names, enum_values
from convlens.v1 import convlens_pb2 as pb

PRESETS = enum_names(pb.MaximizePreset, maximize.PRESETS, unspecified="lucid")
PARAMETERIZATIONS = enum_names(pb.Parameterization, maximize.PARAMETERIZATIONS, unspecified=None)  # unset: preset's
PRESET_VALUES = enum_values(PRESETS)
PARAMETERIZATION_VALUES = enum_values(PARAMETERIZATIONS)


def query(request: pb.MaximizeUnitRequest) -> MaximizeQuery:
    overrides: dict[str, Any] = {k: getattr(request, k) for k in maximize.KNOBS if request.HasField(k)}
    if request.HasField("diversity_layer"):
        overrides["diversity_layer"] = request.diversity_layer
    if request.parameterization != pb.PARAMETERIZATION_UNSPECIFIED:
        overrides["parameterization"] = enum(PARAMETERIZATIONS, request.parameterization, "parameterization",
                                             "Parameterization")
    return MaximizeQuery(
        model=request.model,
        target=target(request.target, request.HasField("target")),
        preset=enum(PRESETS, request.preset, "preset", "MaximizePreset"),
        overrides=overrides,
        preview_every=request.preview_every,
    )


def settings(s: MaximizeSettings) -> pb.MaximizeSettings:
    values = s.as_dict()
    values["preset"] = PRESET_VALUES[s.preset]
    values["parameterization"] = PARAMETERIZATION_VALUES[s.parameterization]
    return pb.MaximizeSettings(**values)


def response(event: Progress | MaximizeAnswer) -> pb.MaximizeUnitResponse:
    if isinstance(event, Progress):
        return pb.MaximizeUnitResponse(progress=progress(event))
    return pb.MaximizeUnitResponse(result=pb.MaximizeUnitResult(
        image_png=png(event.image), objective=event.objective,
        predictions=[prediction(p) for p in event.predictions], settings=settings(event.settings),
        target=target_message(event.target), gram_similarity=event.gram_similarity,
        images=[pb.MaximizeImage(image_png=png(i.image), objective=i.objective,
                                 predictions=[prediction(p) for p in i.predictions]) for i in event.images]))
