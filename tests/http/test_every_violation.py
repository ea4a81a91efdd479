"""A Saliency (or MaximizeUnit) request with several bad fields gets one INVALID_ARGUMENT naming every one,
over gRPC, over HTTP/JSON (the same list) and over KServe's `:explain` (the same list, as paths in KServe's
body); an unknown layer is a NOT_FOUND answered on its own (the .proto header's rule)."""

from __future__ import annotations

import base64
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from google.rpc import error_details_pb2, status_pb2

from convlens.v1 import convlens_pb2 as pb

from .conftest import MODEL, Front, photo, png

ENCODED = png(photo(40, 48, seed=3))
IMAGE = pb.Image(encoded=ENCODED)
SMOOTHGRAD = pb.SALIENCY_METHOD_SMOOTHGRAD
IG = pb.SALIENCY_METHOD_INTEGRATED_GRADIENTS

# (request, the fields named, in order). The tiny model has 5 classes and layers stage1/stage2.
CASES = [
    (pb.SaliencyRequest(model=MODEL, image=IMAGE, method=SMOOTHGRAD, smoothgrad=pb.SmoothGradOptions(samples=0),
                        target=pb.Target(class_index=99)),
     ["smoothgrad.samples", "target.class_index"]),
    (pb.SaliencyRequest(model=MODEL, target=pb.Target(class_index=99)), ["image", "target.class_index"]),
    (pb.SaliencyRequest(model=MODEL, image=IMAGE, method=IG,
                        integrated_gradients=pb.IntegratedGradientsOptions(steps=0),
                        target=pb.Target(unit=pb.Unit(layer="stage1", channel=500))),
     ["integrated_gradients.steps", "target.unit.channel"]),
    (pb.SaliencyRequest(model=MODEL, image=IMAGE, method=SMOOTHGRAD,
                        smoothgrad=pb.SmoothGradOptions(samples=0, noise_level=2.0),
                        grad_cam=pb.GradCamOptions(layer="_fc"), target=pb.Target(class_index=-1)),
     ["smoothgrad.samples", "smoothgrad.noise_level", "target.class_index", "grad_cam.layer"]),
    (pb.SaliencyRequest(model=MODEL, image=IMAGE, method=IG,
                        integrated_gradients=pb.IntegratedGradientsOptions(baseline=pb.BASELINE_IMAGE, steps=0)),
     ["integrated_gradients.steps", "baseline_image"]),
]


def grpc_violations(err: grpc.aio.AioRpcError) -> tuple[list[str], str]:
    """(the BadRequest's fields, the ErrorInfo's reason) of a status."""
    blob = dict(err.trailing_metadata() or ())["grpc-status-details-bin"]
    fields: list[str] = []
    reason = ""
    for detail in status_pb2.Status.FromString(blob).details:
        bad, info = error_details_pb2.BadRequest(), error_details_pb2.ErrorInfo()
        if detail.Unpack(bad):
            fields += [v.field for v in bad.field_violations]
        elif detail.Unpack(info):
            reason = info.reason
    return fields, reason


def http_violations(body: dict[str, Any]) -> tuple[list[str], str]:
    details = {d["type"]: d["debug"] for d in body["details"]}
    return ([v["field"] for v in details["google.rpc.BadRequest"]["fieldViolations"]],
            details["google.rpc.ErrorInfo"]["reason"])


@pytest.mark.parametrize(("request_", "fields"), CASES)
async def test_every_bad_field_is_named_at_once_over_grpc_and_http(front: Front, request_: Any,
                                                                   fields: list[str]) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await front.stub.Saliency(request_)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert grpc_violations(raised.value) == (fields, "INVALID_ARGUMENT")
    assert f"and {len(fields) - 1} more" in (raised.value.details() or "")
    answer = await front.http.post("/convlens.v1.InspectionService/Saliency",
                                   content=json_format.MessageToJson(request_))
    assert answer.status_code == 400
    assert http_violations(answer.json()) == (fields, "INVALID_ARGUMENT")


async def test_explain_names_the_same_fields_as_paths_in_the_kserve_body(front: Front) -> None:
    """The image is `instances[i]` and every other field comes from `parameters`, as its JSON errors say."""
    body = {"instances": [{"b64": base64.b64encode(ENCODED).decode()}],
            "parameters": {"method": "smoothgrad", "smoothgrad": {"samples": 0}, "target": 99}}
    answer = await front.http.post(f"/v1/models/{MODEL}:explain", json=body)
    assert answer.status_code == 400, answer.text
    assert http_violations(answer.json()) == (
        ["parameters.smoothgrad.samples", "parameters.target.class_index"], "INVALID_ARGUMENT")
    assert answer.json()["error"].startswith("instances[0]: ")
    # a second instance that cannot be decoded is named by its index
    body = {"instances": [{"b64": base64.b64encode(ENCODED).decode()}, {"b64": base64.b64encode(b"junk").decode()}],
            "parameters": {"method": "gradient"}}
    answer = await front.http.post(f"/v1/models/{MODEL}:explain", json=body)
    assert answer.status_code == 400, answer.text
    assert http_violations(answer.json())[0] == ["instances[1]"]


async def test_an_unknown_layer_is_a_not_found_listing_the_other_bad_fields(front: Front) -> None:
    """The .proto's rule: an unknown layer makes the answer NOT_FOUND, and its BadRequest also names the
    request's other bad fields that can be judged without the layer (the channel cannot)."""
    request = pb.SaliencyRequest(model=MODEL, method=SMOOTHGRAD, smoothgrad=pb.SmoothGradOptions(samples=0),
                                 target=pb.Target(unit=pb.Unit(layer="nope", channel=0)))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await front.stub.Saliency(request)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    fields, reason = grpc_violations(raised.value)
    assert sorted(fields) == ["image", "smoothgrad.samples", "target.unit.layer"] and reason == "LAYER_NOT_FOUND"


@pytest.mark.parametrize(("request_", "fields"), [
    (pb.MaximizeUnitRequest(model=MODEL, target=pb.Target(class_index=99), steps=0), ["target.class_index", "steps"]),
    (pb.MaximizeUnitRequest(model=MODEL, steps=0, size=1, preview_every=-1),
     ["target", "preview_every", "steps", "size"]),
])
async def test_maximize_unit_names_its_target_and_settings_at_once(front: Front, request_: Any,
                                                                   fields: list[str]) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        [r async for r in front.stub.MaximizeUnit(request_)]
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert grpc_violations(raised.value) == (fields, "INVALID_ARGUMENT")
    answer = await front.http.post("/convlens.v1.InspectionService/MaximizeUnit",
                                   content=json_format.MessageToJson(request_))
    assert answer.status_code == 400
    assert http_violations(answer.json())[0] == grpc_violations(raised.value)[0]
