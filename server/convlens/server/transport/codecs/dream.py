"""Dream messages."""

from __future__ import annotations

from convlens.server.service.dream import DreamAnswer, DreamQuery
from convlens.server.service.streaming import Progress
from convlens.server.transport.codecs.common import given, optional_image, png, progress
from convlens.v1 import convlens_pb2 as pb


def query(request: pb.DreamRequest) -> DreamQuery:
    """Unset optional numbers mean the defaults (None); set ones, 0 included, go to the service, which
    validates the ranges."""
    return DreamQuery(
        model=request.model,
        image=optional_image(request, "image"),
        layer=request.layer or None,
        channel=given(request, "channel"),
        octaves=given(request, "octaves"),
        octave_scale=given(request, "octave_scale"),
        steps_per_octave=given(request, "steps_per_octave"),
        step_size=given(request, "step_size"),
        jitter=given(request, "jitter"),
        guide=optional_image(request, "guide"),
        seed=given(request, "seed"),
        preview_every=int(request.preview_every),
        max_size=given(request, "max_size"),
    )


def response(event: Progress | DreamAnswer) -> pb.DreamResponse:
    if isinstance(event, Progress):
        return pb.DreamResponse(progress=progress(event))
    s = event.settings
    settings = pb.DreamSettings(
        layer=s.layer, octaves=s.octaves, octave_scale=s.octave_scale, steps_per_octave=s.steps_per_octave,
        step_size=s.step_size, jitter=s.jitter, max_size=s.max_size, seed=s.seed, guided=event.guided,
        height=event.image.height, width=event.image.width)
    if s.channel is not None:
        settings.channel = s.channel
    return pb.DreamResponse(result=pb.DreamResult(
        image_png=png(event.image), objective=event.objective, input_objective=event.input_objective,
        settings=settings))
