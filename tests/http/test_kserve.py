"""KServe's v1 explainer protocol: readiness, and `:explain` with KServe's request shape answered with the
numbers gRPC Saliency gives for the same images and options."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from convlens.v1 import convlens_pb2 as pb
from convlens.wire.tensors import to_numpy, to_tensor

from .conftest import MODEL, Front, photo, png, start_front


def tensor_of(explained: dict[str, Any]) -> np.ndarray:
    assert explained["dtype"] == "float32"
    array = np.asarray(explained["values"], dtype=np.float32)
    assert list(array.shape) == explained["shape"]
    return array


def assert_same_explanation(explained: dict[str, Any], by_grpc: pb.SaliencyResponse) -> None:
    """The JSON explanation carries exactly gRPC's attribution, heatmap, target and predictions."""
    attribution = to_numpy(by_grpc.attribution)
    assert np.abs(attribution).sum() > 0
    np.testing.assert_array_equal(tensor_of(explained["attribution"]), attribution)
    np.testing.assert_array_equal(tensor_of(explained["heatmap"]), to_numpy(by_grpc.heatmap))
    assert np.float32(explained["targetValue"]) == np.float32(by_grpc.target_value)
    assert [p["classIndex"] for p in explained["predictions"]] == [p.class_index for p in by_grpc.predictions]
    if by_grpc.overlay_png:
        assert base64.b64decode(explained["overlayPng"]["b64"]) == by_grpc.overlay_png


async def test_explain_with_b64_instances_equals_grpc_saliency(front: Front) -> None:
    images = [png(photo(40, 48, seed=1)), png(photo(32, 32, seed=2))]
    body = {"instances": [{"b64": base64.b64encode(i).decode()} for i in images],
            "parameters": {"method": "grad_cam", "target": 3, "renderOverlay": True,
                           "gradCam": {"layer": "stage1"}}}
    answer = await front.http.post(f"/v1/models/{MODEL}:explain", json=body)
    assert answer.status_code == 200, answer.text
    explanations = answer.json()["explanations"]
    assert len(explanations) == 2
    for image, explained in zip(images, explanations, strict=True):
        by_grpc = await front.stub.Saliency(pb.SaliencyRequest(
            model=MODEL, image=pb.Image(encoded=image), method=pb.SALIENCY_METHOD_GRAD_CAM,
            target=pb.Target(class_index=3), render_overlay=True, grad_cam=pb.GradCamOptions(layer="stage1")))
        assert_same_explanation(explained, by_grpc)
        assert explained["target"] == {"classIndex": 3}


async def test_explain_with_nested_list_pixels_and_a_unit_target(front: Front) -> None:
    pixels = photo(32, 32, seed=5)
    body = {"instances": [pixels.tolist()],
            "parameters": {"method": "gradient", "target": {"layer": "stage2", "channel": 1}}}
    answer = await front.http.post(f"/v1/models/{MODEL}:explain", json=body)
    assert answer.status_code == 200, answer.text
    by_grpc = await front.stub.Saliency(pb.SaliencyRequest(
        model=MODEL, image=pb.Image(tensor=to_tensor(pixels)), method=pb.SALIENCY_METHOD_GRADIENT,
        target=pb.Target(unit=pb.Unit(layer="stage2", channel=1))))
    assert_same_explanation(answer.json()["explanations"][0], by_grpc)


async def test_readiness_names_and_errors(front: Front) -> None:
    ready = await front.http.get(f"/v1/models/{MODEL}")
    assert ready.status_code == 200 and ready.json() == {"name": MODEL, "ready": True}
    assert (await front.http.get("/v1/models")).json() == {"models": [MODEL]}
    assert (await front.http.get("/")).json() == {"status": "alive"}
    missing = await front.http.get("/v1/models/nope")
    assert missing.status_code == 404 and "nope" in missing.json()["error"]
    predict = await front.http.post(f"/v1/models/{MODEL}:predict", json={"instances": [[0]]})
    assert predict.status_code == 501 and predict.json()["code"] == "unimplemented"


async def test_bad_explain_requests_name_the_field(front: Front) -> None:
    cases = [({"instances": []}, "instances"),
             ({"instances": [{"b64": "not base64!"}]}, "instances[0].b64"),
             ({"instances": [[[[1, 2, 3], [1, 2]]]]}, "instances[0]"),
             ({"instances": [[[[300, 0, 0]]]]}, "instances[0]"),
             ({"instances": [[[[1, 2, 3]]]], "parameters": {"method": "nope"}}, "parameters.method"),
             ({"instances": [[[[1, 2, 3]]]], "parameters": {"model": "x"}}, "parameters.model")]
    for body, field in cases:
        answer = await front.http.post(f"/v1/models/{MODEL}:explain", json=body)
        assert answer.status_code == 400, (body, answer.text)
        (bad_request,) = [d for d in answer.json()["details"] if d["type"] == "google.rpc.BadRequest"]
        violations = bad_request["debug"]["fieldViolations"]
        assert [v["field"] for v in violations] == [field], body


async def test_tokens_apply_over_http_as_over_grpc(tmp_path: Path) -> None:
    srv = await start_front(tmp_path, auth_tokens="ci:tok-1")
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{srv.http_port}", timeout=60) as http:
            rpc = "/convlens.v1.InspectionService/ListModels"
            missing = await http.post(rpc, content="{}")
            assert missing.status_code == 401 and missing.json()["code"] == "unauthenticated"
            assert "Bearer" in missing.json()["message"]
            wrong = await http.post(rpc, content="{}", headers={"authorization": "Bearer nope"})
            assert wrong.status_code == 401
            ok = await http.post(rpc, content="{}", headers={"authorization": "Bearer tok-1"})
            assert ok.status_code == 200 and ok.json()["models"][0]["name"] == MODEL
            body = {"instances": [photo(32, 32).tolist()]}
            assert (await http.post(f"/v1/models/{MODEL}:explain", json=body)).status_code == 401
            assert (await http.post(f"/v1/models/{MODEL}:explain", json=body,
                                    headers={"authorization": "Bearer tok-1"})).status_code == 200
            # a bad body from a caller without a token is refused for the token first, as over gRPC
            assert (await http.post(rpc, content="{oops")).status_code == 401
            # readiness needs no token: Kubernetes probes cannot send one (like gRPC health)
            assert (await http.get(f"/v1/models/{MODEL}")).status_code == 200
            # model control needs an admin token over HTTP as over gRPC
            unload = "/convlens.v1.ModelRepositoryService/UnloadModel"
            denied = await http.post(unload, content=f'{{"model": "{MODEL}"}}',
                                     headers={"authorization": "Bearer tok-1"})
            assert denied.status_code == 403 and denied.json()["code"] == "permission_denied"
    finally:
        await srv.stop(0.0)


async def test_with_tokens_the_token_is_checked_before_names_are_resolved(tmp_path: Path) -> None:
    """A caller without a token learns nothing about which names are served: 401 before 404, and the list
    needs a token; readiness stays open for probes without telling served names from others."""
    srv = await start_front(tmp_path, auth_tokens="ci:tok-1")
    token = {"authorization": "Bearer tok-1"}
    body = {"instances": [photo(32, 32).tolist()]}
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{srv.http_port}", timeout=60) as http:
            listed = await http.get("/v1/models")
            assert listed.status_code == 401 and listed.json()["code"] == "unauthenticated"
            assert MODEL not in listed.text
            assert (await http.get("/v1/models", headers=token)).json() == {"models": [MODEL]}
            unknown = await http.post("/v1/models/nope:explain", json=body)
            assert unknown.status_code == 401 and "nope" not in unknown.text
            bad_body = await http.post(f"/v1/models/{MODEL}:explain", content="{oops")
            assert bad_body.status_code == 401
            assert (await http.post("/v1/models/nope:explain", json=body, headers=token)).status_code == 404
            # readiness: without a token the same answer for any name; with one, 404 for an unknown name
            served, other = (await http.get(f"/v1/models/{MODEL}")), (await http.get("/v1/models/nope"))
            assert (served.status_code, other.status_code) == (200, 200)
            assert other.json() == {"name": "nope", "ready": True}
            assert (await http.get("/v1/models/nope", headers=token)).status_code == 404
        # the refused explain calls were counted like any Saliency call, with their codes
        handled = srv.metrics.registry.get_sample_value("grpc_server_handled_total", {
            "grpc_type": "unary", "grpc_service": "convlens.v1.InspectionService", "grpc_method": "Saliency",
            "grpc_code": "UNAUTHENTICATED", "protocol": "http"})
        assert handled == 2.0
    finally:
        await srv.stop(0.0)
