"""The contract over HTTP/JSON: every unary RPC answers what gRPC answers, streams arrive as server-sent
events, bad JSON is a 400 naming the field, and errors carry Connect's code, message and details."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from google.protobuf import json_format
from google.rpc import error_details_pb2

from convlens.server.scheduler import BatchPolicy
from convlens.server.transport.http.errors import HTTP_STATUS
from convlens.v1 import convlens_pb2 as pb
from convlens.v1 import convlens_pb2_grpc as pb_grpc

from .conftest import MODEL, Front, photo, png, sse_events, start_front

SERVICE = pb.DESCRIPTOR.services_by_name["InspectionService"]
IMAGE = pb.Image(encoded=png(photo(40, 48, seed=3)))


def unary_requests() -> dict[str, Any]:
    """One representative request per unary RPC of the contract."""
    return {
        "ListModels": pb.ListModelsRequest(),
        "GetModel": pb.GetModelRequest(model=MODEL),
        "GetFilters": pb.GetFiltersRequest(model=MODEL, layer="_conv_stem", render_grid=True),
        "Saliency": pb.SaliencyRequest(model=MODEL, image=IMAGE, target=pb.Target(class_index=2),
                                       method=pb.SALIENCY_METHOD_GUIDED_BACKPROP, render_overlay=True),
        "TopActivations": pb.TopActivationsRequest(
            model=MODEL, layer="stage1", channel=3, k=2, include_crops=True,
            images=[IMAGE, pb.Image(encoded=png(photo(36, 36, seed=4)))]),
        "ListDatasets": pb.ListDatasetsRequest(),
    }


def detail_of(error: dict[str, Any], kind: str) -> dict[str, Any]:
    (detail,) = [d for d in error["details"] if d["type"] == kind]
    return detail


async def post(front: Front, method: str, body: Any, **headers: str) -> Any:
    data = body if isinstance(body, (str, bytes)) else json_format.MessageToJson(body)
    return await front.http.post(f"/convlens.v1.InspectionService/{method}", content=data, headers=headers)


async def test_every_unary_rpc_over_http_equals_its_grpc_answer(front: Front) -> None:
    requests = unary_requests()
    unary = {m.name for m in SERVICE.methods if not m.server_streaming}
    assert set(requests) == unary, "a unary RPC without a request here: add one"
    for name, request in requests.items():
        method = SERVICE.methods_by_name[name]
        by_grpc = await getattr(front.stub, name)(request)
        answer = await post(front, name, request)
        assert answer.status_code == 200, (name, answer.text)
        assert answer.headers["content-type"] == "application/json"
        by_http = json_format.Parse(answer.text, getattr(pb, method.output_type.name)())
        assert by_http == by_grpc, name
        assert by_http.ByteSize() > 0, name
    # a Saliency with numbers in it: the attribution is the same float32 values, not merely close
    saliency = await front.stub.Saliency(requests["Saliency"])
    assert np.abs(np.frombuffer(saliency.attribution.data, np.float32)).sum() > 0


async def test_an_http_and_a_grpc_saliency_share_one_batch(tmp_path: Path) -> None:
    """One scheduler behind both protocols. Batches of two that wait (up to 120 s) for a companion: one HTTP
    and one gRPC call, sent together, are computed as one batch of two, and answer the same numbers."""
    policy = BatchPolicy(max_batch_size=2, max_batch_delay=120.0, shards=1)
    srv = await start_front(tmp_path, policies={"cpu": policy})
    request = unary_requests()["Saliency"]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as channel, \
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{srv.http_port}", timeout=180) as http:
            by_grpc, by_http = await asyncio.gather(
                pb_grpc.InspectionServiceStub(channel).Saliency(request, timeout=180),
                http.post("/convlens.v1.InspectionService/Saliency", content=json_format.MessageToJson(request)))
        registry = srv.metrics.registry
    finally:
        await srv.stop(0.0)
    assert by_http.status_code == 200, by_http.text
    assert json_format.Parse(by_http.text, pb.SaliencyResponse()) == by_grpc
    sizes = {s.name: s.value for m in registry.collect() if m.name == "convlens_scheduler_batch_size"
             for s in m.samples if s.labels.get("rpc") == "Saliency" and s.name.endswith(("_count", "_sum"))}
    assert sizes == {"convlens_scheduler_batch_size_count": 1.0, "convlens_scheduler_batch_size_sum": 2.0}
    for protocol in ("grpc", "http"):
        assert registry.get_sample_value("grpc_server_handled_total", {
            "grpc_type": "unary", "grpc_service": SERVICE.full_name, "grpc_method": "Saliency", "grpc_code": "OK",
            "protocol": protocol}) == 1.0


async def test_the_model_repository_service_over_http_equals_grpc(front: Front) -> None:
    """No HTTP code names this service: it is served because the gRPC server registered it."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{front.server.port}") as channel:
        by_grpc = await pb_grpc.ModelRepositoryServiceStub(channel).RepositoryIndex(pb.RepositoryIndexRequest())
    answer = await front.http.post("/convlens.v1.ModelRepositoryService/RepositoryIndex", content="{}")
    assert answer.status_code == 200, answer.text
    by_http = json_format.Parse(answer.text, pb.RepositoryIndexResponse())
    assert by_http == by_grpc and MODEL in answer.text


async def test_dream_over_sse_delivers_every_progress_event_and_the_final_image(front: Front) -> None:
    request = pb.DreamRequest(model=MODEL, image=pb.Image(encoded=png(photo())), layer="stage1", octaves=2,
                              steps_per_octave=3, jitter=4, seed=1, max_size=48, preview_every=2)
    by_grpc = [r async for r in front.stub.Dream(request)]
    answer = await post(front, "Dream", request)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/event-stream")
    events = sse_events(answer.text)
    names = [e for e, _ in events]
    assert names == ["progress"] * 6 + ["result", "end"]
    by_http = [json_format.ParseDict(data, pb.DreamResponse()) for _, data in events[:-1]]
    assert [m.progress.step for m in by_http[:-1]] == list(range(1, 7))
    assert [m.progress.step for m in by_http[:-1] if m.progress.preview_png] == [2, 4]
    result = by_http[-1].result
    assert result.image_png.startswith(b"\x89PNG") and result.image_png == by_grpc[-1].result.image_png
    assert [m.progress.step for m in by_http[:-1]] == [m.progress.step for m in by_grpc[:-1]]


async def test_a_stream_refused_at_once_answers_a_json_error_with_its_status(front: Front) -> None:
    answer = await post(front, "Dream", pb.DreamRequest(model="nope", image=pb.Image(encoded=png(photo()))))
    assert answer.status_code == 404
    assert answer.json()["code"] == "not_found" and "nope" in answer.json()["message"]


@pytest.mark.parametrize(("body", "field"), [
    ('{"model": "tinylite", "modle": 1}', "modle"),
    ('{"model": "tinylite", "target": {"unit": {"layer": "stage1", "channel": "three"}}}', "target.unit.channel"),
    ('{"model": "tinylite", "method": "SALIENCY_METHOD_NOPE"}', "method"),
    ('{"model": "tinylite", "smoothgrad": {"samples": 1.5}}', "smoothgrad.samples"),
    ('{"model": "tinylite",', "(body)"),
    ("[1, 2]", "(body)"),
])
async def test_bad_json_is_a_400_naming_the_field(front: Front, body: str, field: str) -> None:
    answer = await post(front, "Saliency", body)
    assert answer.status_code == 400, answer.text
    error = answer.json()
    assert error["code"] == "invalid_argument"
    assert detail_of(error, "google.rpc.ErrorInfo")["debug"]["reason"] == "INVALID_JSON"
    detail = detail_of(error, "google.rpc.BadRequest")
    assert [v["field"] for v in detail["debug"]["fieldViolations"]] == [field]
    # the binary form Connect clients decode says the same
    value = base64.b64decode(detail["value"] + "=" * (-len(detail["value"]) % 4))
    assert [v.field for v in error_details_pb2.BadRequest.FromString(value).field_violations] == [field]


async def test_a_domain_error_carries_the_same_code_and_violations_as_over_grpc(front: Front) -> None:
    request = pb.SaliencyRequest(model=MODEL, image=IMAGE, target=pb.Target(unit=pb.Unit(layer="nope", channel=0)))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await front.stub.Saliency(request)
    answer = await post(front, "Saliency", request)
    assert answer.status_code == HTTP_STATUS[raised.value.code()]
    error = answer.json()
    assert error["code"] == raised.value.code().name.lower() and error["message"] == raised.value.details()
    assert detail_of(error, "google.rpc.BadRequest")["debug"]["fieldViolations"][0]["field"] == "target.unit.layer"
    assert detail_of(error, "google.rpc.ErrorInfo")["debug"]["reason"] == "LAYER_NOT_FOUND"


async def test_the_request_id_is_echoed_and_http_calls_are_counted_with_their_protocol(front: Front) -> None:
    answer = await post(front, "ListModels", "{}", **{"x-request-id": "abc-123"})
    assert answer.status_code == 200 and answer.headers["x-request-id"] == "abc-123"
    await front.stub.ListModels(pb.ListModelsRequest())
    registry = front.server.metrics.registry

    def handled(protocol: str) -> float | None:
        return registry.get_sample_value("grpc_server_handled_total", {
            "grpc_type": "unary", "grpc_service": SERVICE.full_name, "grpc_method": "ListModels",
            "grpc_code": "OK", "protocol": protocol})
    assert handled("http") == 1.0 and handled("grpc") == 1.0


async def test_every_contract_method_has_a_route_and_unknown_paths_answer_json(front: Front) -> None:
    """Routes come from what the gRPC server registers: every service of the contract is there, including
    ones no HTTP code names (ModelRepositoryService)."""
    services = list(pb.DESCRIPTOR.services_by_name.values())
    assert len(services) >= 2
    for service in services:
        for method in service.methods:
            answer = await front.http.post(f"/{service.full_name}/{method.name}", content="{}")
            assert "no such route" not in answer.text, method.full_name
    answer = await front.http.post("/convlens.v1.InspectionService/Nope", content="{}")
    assert answer.status_code == 404 and answer.json()["code"] == "not_found"
    answer = await front.http.get("/convlens.v1.InspectionService/ListModels")
    assert answer.status_code == 405 and answer.json()["code"] == "unimplemented"


async def test_timeout_headers_are_checked(front: Front) -> None:
    for header, value in (("grpc-timeout", "5x"), ("connect-timeout-ms", "soon")):
        answer = await post(front, "ListModels", "{}", **{header: value})
        violations = detail_of(answer.json(), "google.rpc.BadRequest")["debug"]["fieldViolations"]
        assert answer.status_code == 400 and violations[0]["field"] == header
    assert (await post(front, "ListModels", "{}", **{"grpc-timeout": "5S"})).status_code == 200


def test_every_status_code_has_an_http_status() -> None:
    assert set(HTTP_STATUS) == set(grpc.StatusCode) - {grpc.StatusCode.OK}


async def test_the_any_address_listens_for_ipv4_callers_too(tmp_path: Path) -> None:
    """gRPC's default host "[::]" takes IPv4 connections; so must the HTTP port (a Kubernetes probe comes to
    the pod's IPv4 address)."""
    srv = await start_front(tmp_path, http_host="[::]")
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{srv.http_port}") as http:
            assert (await http.get(f"/v1/models/{MODEL}")).json()["ready"] is True
    finally:
        await srv.stop(0.0)


async def test_reflection_still_answers_on_the_recording_server(front: Front) -> None:
    """app.py registers services on a RecordingServer; reflection must still get its asyncio servicer."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{front.server.port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name async for reply in call for s in reply.list_services_response.service}
    assert {"convlens.v1.InspectionService", "convlens.v1.ModelRepositoryService"} <= names
