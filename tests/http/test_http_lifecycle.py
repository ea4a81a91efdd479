"""An HTTP call's life as a gRPC call's: a caller who hangs up frees its job, the deadline header ends it,
and a drain lets a running stream finish while refusing new calls with 503."""

from __future__ import annotations

import asyncio

from google.protobuf import json_format

from convlens.v1 import convlens_pb2 as pb
from tests.scheduler.helpers import wait_until

from .conftest import MODEL, Front, photo, png, sse_events

DREAM = "/convlens.v1.InspectionService/Dream"


def long_dream(octaves: int = 2, steps: int = 200) -> str:
    return json_format.MessageToJson(pb.DreamRequest(
        model=MODEL, image=pb.Image(encoded=png(photo())), layer="stage1", octaves=octaves,
        steps_per_octave=steps, max_size=48))


def handled(front: Front, code: str) -> float:
    value = front.server.metrics.registry.get_sample_value("grpc_server_handled_total", {
        "grpc_type": "server_stream", "grpc_service": "convlens.v1.InspectionService", "grpc_method": "Dream",
        "grpc_code": code, "protocol": "http"})
    return value or 0.0


async def test_a_caller_who_hangs_up_frees_its_job(front: Front) -> None:
    scheduler = front.server._scheduler
    assert scheduler is not None
    async with front.http.stream("POST", DREAM, content=long_dream()) as answer:
        assert answer.status_code == 200
        async for line in answer.aiter_lines():
            if line.startswith("event: progress"):
                break
        assert scheduler.active_jobs() == 1
    # the connection is closed: the server cancels the call (as grpc does when a caller leaves)
    await wait_until(lambda: scheduler.active_jobs() == 0 and handled(front, "CANCELLED") == 1.0, timeout=30)
    steps = front.server.metrics.steps.labels(model=MODEL, rpc="Dream")._value.get()
    assert steps < 400  # freed mid-run, not finished


async def test_the_timeout_header_ends_a_stream_with_deadline_exceeded(front: Front) -> None:
    answer = await front.http.post(DREAM, content=long_dream(8, 200), headers={"connect-timeout-ms": "300"})
    if answer.status_code == 200:  # the deadline passed after the first event: the stream's last event says so
        event, data = sse_events(answer.text)[-1]
        assert event == "error"
    else:
        assert answer.status_code == 504
        data = answer.json()
    assert data["code"] == "deadline_exceeded"
    assert front.server._scheduler is not None and front.server._scheduler.active_jobs() == 0


async def test_a_drain_finishes_a_running_stream_and_refuses_new_calls(front: Front) -> None:
    async with front.http.stream("POST", DREAM, content=long_dream(1, 40)) as answer:
        lines = answer.aiter_lines()
        async for line in lines:
            if line.startswith("event: progress"):
                break
        stopping = asyncio.create_task(front.server.stop(60.0))
        await wait_until(lambda: front.server.drain.draining)
        refused = await front.http.post("/convlens.v1.InspectionService/ListModels", content="{}")
        assert refused.status_code == 503 and refused.json()["code"] == "unavailable"
        ready = await front.http.get(f"/v1/models/{MODEL}")
        assert ready.status_code == 503 and ready.json()["ready"] is False
        rest = "\n".join(["event: progress", *[line async for line in lines]])
    events = sse_events(rest)
    assert [e for e, _ in events][-2:] == ["result", "end"], rest[-300:]
    assert [e for e, _ in events[:-2]] == ["progress"] * 40
    assert events[-2][1]["result"]["imagePng"]
    await stopping
