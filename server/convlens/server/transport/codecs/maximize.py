"""MaximizeUnit messages: the request's preset and optional knobs in; progress events and the result out."""

from __future__ import annotations

from typing import Any

from convlens.server.engine.optimize.maximize import MaximizeSettings
from convlens.server.service.maximize import MaximizeAnswer, MaximizeProgress, MaximizeQuery
from convlens.server.transport.codecs.common import enum, png, prediction, target, target_message
from convlens.v1 import convlens_pb2 as pb

PRESETS = {pb.MAXIMIZE_PRESET_UNSPECIFIED: "lucid", pb.MAXIMIZE_PRESET_LECTURE: "lecture",
           pb.MAXIMIZE_PRESET_LUCID: "lucid", pb.MAXIMIZE_PRESET_MACO: "maco"}
PARAMETERIZATIONS = {pb.PARAMETERIZATION_PIXEL: "pixel", pb.PARAMETERIZATION_FFT: "fft",
                     pb.PARAMETERIZATION_MACO: "maco"}
# Optional request fields that override the preset (same names in MaximizeSettings).
KNOBS = ("steps", "size", "learning_rate", "l2_decay", "blur_every", "blur_sigma", "jitter", "scale_jitter",
         "rotate_degrees", "seed", "value_percentile", "contribution_percentile", "tv_weight", "pad",
         "final_jitter", "decay_power", "images", "diversity", "diversity_layer")
PRESET_ENUMS = {name: value for value, name in PRESETS.items() if value != pb.MAXIMIZE_PRESET_UNSPECIFIED}
PARAMETERIZATION_ENUMS = {name: value for value, name in PARAMETERIZATIONS.items()}


def query(request: pb.MaximizeUnitRequest) -> MaximizeQuery:
    overrides: dict[str, Any] = {k: getattr(request, k) for k in KNOBS if request.HasField(k)}
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
    values["preset"] = PRESET_ENUMS[s.preset]
    values["parameterization"] = PARAMETERIZATION_ENUMS[s.parameterization]
    return pb.MaximizeSettings(**values)


def response(event: MaximizeProgress | MaximizeAnswer) -> pb.MaximizeUnitResponse:
    if isinstance(event, MaximizeProgress):
        return pb.MaximizeUnitResponse(progress=pb.Progress(
            step=event.step, total_steps=event.total_steps, objectives=event.terms, preview_png=png(event.preview)))
    return pb.MaximizeUnitResponse(result=pb.MaximizeUnitResult(
        image_png=png(event.image), objective=event.objective,
        predictions=[prediction(p) for p in event.predictions], settings=settings(event.settings),
        target=target_message(event.target), gram_similarity=event.gram_similarity,
        images=[pb.MaximizeImage(image_png=png(i.image), objective=i.objective,
                                 predictions=[prediction(p) for p in i.predictions]) for i in event.images]))
