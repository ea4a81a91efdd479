"""Saliency messages."""

from __future__ import annotations

from convlens.server.engine import integrated_gradients, saliency, smoothgrad
from convlens.server.engine.saliency import SaliencyOptions
from convlens.server.errors import InvalidArgument
from convlens.server.service.saliency import OUTPUTS, SaliencyAnswer, SaliencyQuery
from convlens.server.transport.codecs.common import (
    enum,
    geometry,
    given,
    optional_image,
    outputs,
    png,
    prediction,
    target,
    target_message,
    tensor,
)
from convlens.server.transport.codecs.vocabulary import enum_names
from convlens.v1 import convlens_pb2 as pb

METHODS = enum_names(pb.SaliencyMethod, saliency.METHODS, unspecified="gradient")
SMOOTH_BASES = smoothgrad.BASES
BASELINES = enum_names(pb.Baseline, integrated_gradients.BASELINES, unspecified="black")
SALIENCY_OUTPUTS = enum_names(pb.SaliencyOutput, OUTPUTS, unspecified=None)


def options(request: pb.SaliencyRequest) -> SaliencyOptions:
    method = enum(METHODS, request.method, "method", "SaliencyMethod")
    sg, ig = request.smoothgrad, request.integrated_gradients
    base = enum(METHODS, sg.base_method, "smoothgrad.base_method", "SaliencyMethod")
    if method == "smoothgrad" and base not in SMOOTH_BASES:
        raise InvalidArgument(f"smoothgrad.base_method must be one of {', '.join(SMOOTH_BASES)}",
                              field="smoothgrad.base_method")
    return SaliencyOptions(
        method=method,
        smooth_base=base,
        smooth_samples=given(sg, "samples", SaliencyOptions.smooth_samples),
        smooth_noise=given(sg, "noise_level", SaliencyOptions.smooth_noise),
        seed=int(given(sg, "seed", 0)),
        ig_steps=given(ig, "steps", SaliencyOptions.ig_steps),
        ig_baseline=enum(BASELINES, ig.baseline, "integrated_gradients.baseline", "Baseline"),
        ig_blur_sigma=given(ig, "blur_sigma", SaliencyOptions.ig_blur_sigma),
        cam_layer=request.grad_cam.layer or None,
    )


def query(request: pb.SaliencyRequest) -> SaliencyQuery:
    return SaliencyQuery(
        model=request.model,
        image=optional_image(request, "image"),
        target=target(request.target, request.HasField("target")),
        options=options(request),
        baseline_image=optional_image(request, "baseline_image"),
        render_overlay=request.render_overlay,
        outputs=outputs(SALIENCY_OUTPUTS, request.outputs, pb.SaliencyOutput),
    )


def response(answer: SaliencyAnswer) -> pb.SaliencyResponse:
    r, wanted = answer.result, answer.outputs
    return pb.SaliencyResponse(
        attribution=tensor(r.attribution.numpy()) if "attribution" in wanted else None,
        heatmap=tensor(r.heatmap.numpy()) if "heatmap" in wanted else None,
        overlay_png=png(answer.overlay), predictions=[prediction(p) for p in answer.predictions],
        geometry=geometry(answer.geometry), target=target_message(r.target),
        target_value=r.target_value, modified_activations=r.modified_activations, notes=answer.notes,
        baseline_value=r.baseline_value)
