"""The interceptor in process: access log, request ids, bearer tokens, drain — with a scripted servicer."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import re
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from convlens.server.transport.access_log import AccessLog
from convlens.server.transport.auth import TokenAuth
from convlens.v1 import convlens_pb2 as pb
from convlens.v1 import convlens_pb2_grpc as pb_grpc
from tests.operations.inprocess import InProcessServer, ScriptedServicer

SECRET = "s3cr3t-0123456789abcdef"


def access_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "convlens.access"]


async def test_one_access_line_per_rpc_with_request_id_taken_or_made(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="convlens.access")
    async with InProcessServer() as srv, grpc.aio.insecure_channel(srv.address) as ch:
        stub = pb_grpc.InspectionServiceStub(ch)
        call = stub.GetModel(pb.GetModelRequest(model="0.01"), metadata=(("x-request-id", "req-42"),))
        await call
        assert ("x-request-id", "req-42") in tuple(await call.trailing_metadata())
        call = stub.ListModels(pb.ListModelsRequest())
        await call
        made = dict(await call.trailing_metadata())["x-request-id"]
        call = stub.ListModels(pb.ListModelsRequest())
        await call
        assert re.fullmatch("[0-9a-f]{24,}", made) and dict(await call.trailing_metadata())["x-request-id"] != made
        call = stub.GetModel(pb.GetModelRequest(model="not-a-number"), metadata=(("x-request-id", "req-43"),))
        with pytest.raises(grpc.RpcError):  # an error is logged too, with its code and message
            await call
        assert ("x-request-id", "req-43") in tuple(await call.trailing_metadata())
    lines = access_lines(caplog)
    assert len(lines) == 4, lines
    first, second, _, third = lines
    assert first.startswith("/convlens.v1.InspectionService/GetModel OK ")
    assert "model=0.01" in first and "request_id=req-42" in first and "peer=ipv4:127.0.0.1:" in first
    ms = float(first.split()[2].removesuffix("ms"))
    assert ms >= 10.0  # the servicer slept 10 ms
    assert f"request_id={made}" in second
    assert third.split()[1] == "INTERNAL" and 'error="internal error (ValueError)"' in third


async def test_json_access_lines_parse(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="convlens.access")
    async with InProcessServer(access_log=AccessLog("json")) as srv, grpc.aio.insecure_channel(srv.address) as ch:
        await pb_grpc.InspectionServiceStub(ch).GetModel(pb.GetModelRequest(model="0"),
                                                          metadata=(("x-request-id", "abc"),))
    (line,) = access_lines(caplog)
    rec = json.loads(line)
    assert rec["method"] == "/convlens.v1.InspectionService/GetModel" and rec["code"] == "OK"
    assert rec["model"] == "0" and rec["request_id"] == "abc" and rec["peer"].startswith("ipv4:")
    assert isinstance(rec["ms"], float)


async def test_insane_request_ids_are_replaced() -> None:
    async with InProcessServer() as srv, grpc.aio.insecure_channel(srv.address) as ch:
        call = pb_grpc.InspectionServiceStub(ch).ListModels(pb.ListModelsRequest(),
                                                             metadata=(("x-request-id", "x" * 500),))
        await call
        assert re.fullmatch("[0-9a-f]{24,}", dict(await call.trailing_metadata())["x-request-id"])


# ---------------------------------------------------------------------------------------------- tokens

async def test_tokens_right_passes_wrong_and_missing_unauthenticated_health_exempt(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    file = tmp_path / "tokens"
    file.write_text(f"# callers\nbatch-jobs:{SECRET}\n")
    async with InProcessServer(auth=TokenAuth(path=file)) as srv, grpc.aio.insecure_channel(srv.address) as ch:
        stub = pb_grpc.InspectionServiceStub(ch)
        reply = await stub.ListModels(pb.ListModelsRequest(), metadata=(("authorization", f"Bearer {SECRET}"),))
        assert reply.models[0].name == "m"
        for metadata in [(), (("authorization", "Bearer wrong"),), (("authorization", SECRET),),
                         (("authorization", f"Bearer {SECRET}x"),)]:
            with pytest.raises(grpc.RpcError) as err:
                await stub.ListModels(pb.ListModelsRequest(), metadata=metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "authorization: Bearer <token>" in err.value.details()  # says how to authenticate
        health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert srv.servicer.started == 0
    lines = access_lines(caplog)
    assert any(" OK " in x and "caller=batch-jobs" in x for x in lines)
    assert sum(" UNAUTHENTICATED " in x for x in lines) == 4
    everything = "\n".join(r.getMessage() for r in caplog.records) + caplog.text
    assert SECRET not in everything and SECRET[:8] not in everything


async def test_token_file_is_reread_when_it_changes(tmp_path: Path) -> None:
    file = tmp_path / "tokens"
    file.write_text("old-token\n")
    auth = TokenAuth(path=file, recheck_s=0.0)
    async with InProcessServer(auth=auth) as srv, grpc.aio.insecure_channel(srv.address) as ch:
        stub = pb_grpc.InspectionServiceStub(ch)
        await stub.ListModels(pb.ListModelsRequest(), metadata=(("authorization", "Bearer old-token"),))
        file.write_text("ci:new-token\n")
        with pytest.raises(grpc.RpcError) as err:
            await stub.ListModels(pb.ListModelsRequest(), metadata=(("authorization", "Bearer old-token"),))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        await stub.ListModels(pb.ListModelsRequest(), metadata=(("authorization", "Bearer new-token"),))


def test_env_tokens_and_exemption_is_configurable() -> None:
    auth = TokenAuth(env_tokens="a:tok-a,tok-b", exempt=())
    assert auth.check([("authorization", "Bearer tok-a")]) == "a"
    assert auth.check([("authorization", "bearer tok-b")]) == "env#2"
    assert not auth.is_exempt("/grpc.health.v1.Health/Check")
    assert TokenAuth(env_tokens="x").is_exempt("/grpc.health.v1.Health/Check")
    with pytest.raises(ValueError):
        TokenAuth(env_tokens="")


# ---------------------------------------------------------------------------------------------- drain

async def test_drain_refuses_new_calls_finishes_unary_and_cuts_long_streams_with_progress() -> None:
    async with InProcessServer(servicer=ScriptedServicer(steps=100, step_s=0.02)) as srv, \
            grpc.aio.insecure_channel(srv.address) as ch:
        stub = pb_grpc.InspectionServiceStub(ch)
        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest())
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        unary = stub.GetModel(pb.GetModelRequest(model="0.4"))
        stream = stub.MaximizeUnit(pb.MaximizeUnitRequest())
        while srv.servicer.started < 2:
            await asyncio.sleep(0.01)
        t0 = time.monotonic()
        stopping = asyncio.create_task(srv.shut_down(grace=1.0))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING  # at once
        with pytest.raises(grpc.RpcError) as err:
            await stub.ListModels(pb.ListModelsRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert (await unary).model.name == "0.4"  # the accepted unary call finished
        steps = []
        with pytest.raises(grpc.RpcError) as err:
            async for event in stream:
                steps.append(event.progress.step)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert f"after step {steps[-1]} of 100" in err.value.details()
        await stopping
        assert time.monotonic() - t0 < 1.0 + 0.3  # within the grace, with the watch open throughout
    assert 0 < len(steps) < 100


async def test_drain_returns_as_soon_as_calls_finish() -> None:
    async with InProcessServer() as srv, grpc.aio.insecure_channel(srv.address) as ch:
        call = pb_grpc.InspectionServiceStub(ch).GetModel(pb.GetModelRequest(model="0.2"))
        await srv.servicer.entered.wait()
        t0 = time.monotonic()
        await srv.shut_down(grace=30.0)
        assert time.monotonic() - t0 < 5.0
        assert (await call).model.name == "0.2"


async def test_streams_their_callers_left_are_not_waited_for_by_the_drain() -> None:
    """Callers that cancel a stream as soon as they have what they want (mid-stream, or right after the
    result, while grpc is still writing it): each call is over, and a drain afterwards must not wait its grace
    for any of them. (A generator cancelled outside its body is closed later by the loop's finaliser, after
    grpc's call has ended: `make demo` showed five such streams holding a drain for its whole grace.)"""
    async with InProcessServer(servicer=ScriptedServicer(steps=3, step_s=0.0)) as srv, \
            grpc.aio.insecure_channel(srv.address) as ch:
        stub = pb_grpc.InspectionServiceStub(ch)

        async def leave_after(events: int) -> None:
            stream = stub.MaximizeUnit(pb.MaximizeUnitRequest())
            seen = 0
            async for _ in stream:
                seen += 1
                if seen == events:
                    break
            stream.cancel()

        await asyncio.gather(*(leave_after(1 + i % 4) for i in range(40)))
        deadline = time.monotonic() + 5
        while srv.drain.in_flight and time.monotonic() < deadline:
            gc.collect()  # let abandoned generators be finalised
            await asyncio.sleep(0.05)
        assert srv.drain.in_flight == 0
        t0 = time.monotonic()
        await srv.shut_down(grace=10.0)
        assert time.monotonic() - t0 < 2.0


async def test_the_sdk_reads_a_stream_to_its_status_so_the_server_counts_it_finished() -> None:
    """The SDK returns a stream's result only after the call's status arrived: a call that gave its result
    is counted OK by the server, not CANCELLED (it had cancelled the moment it had the result)."""
    from convlens.client import AsyncClient, Client

    async with InProcessServer(servicer=ScriptedServicer(steps=2, step_s=0.0, after_result_s=0.05)) as srv:
        async with AsyncClient(srv.address) as ac:
            for _ in range(10):
                assert (await ac.maximize_unit("m", 1)).objective == 1.0

        def sync_calls() -> None:
            with Client(srv.address) as c:
                for _ in range(10):
                    assert c.maximize_unit("m", 1).objective == 1.0

        await asyncio.to_thread(sync_calls)
        labels = {"grpc_type": "server_stream", "grpc_service": "convlens.v1.InspectionService",
                  "grpc_method": "MaximizeUnit"}
        labels["protocol"] = "grpc"
        handled = {code: srv.metrics.registry.get_sample_value("grpc_server_handled_total",
                                                               {**labels, "grpc_code": code})
                   for code in ("OK", "CANCELLED")}
        assert handled == {"OK": 20.0, "CANCELLED": None}


async def test_drain_stops_only_once_refused_callers_have_gone_quiet() -> None:
    """A caller that keeps calling during the drain is refused with UNAVAILABLE every time; the server does
    not stop under it (a call reaching a stopping server unmatched would get a bare CANCELLED)."""
    async with InProcessServer() as srv, grpc.aio.insecure_channel(srv.address) as ch:
        stub = pb_grpc.InspectionServiceStub(ch)
        t0 = time.monotonic()
        stopping = asyncio.create_task(srv.shut_down(grace=10.0))
        codes: list[grpc.StatusCode] = []
        while time.monotonic() - t0 < 1.0:  # four times the quiet moment
            last_sent = time.monotonic()  # the server sees the call no earlier than this
            try:
                await stub.ListModels(pb.ListModelsRequest(), timeout=5)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as e:
                codes.append(e.code())
            await asyncio.sleep(0.05)
            assert not stopping.done(), "stopped while a caller was still calling"
        await stopping
        # The server waits a quiet moment (0.25 s) after the last call it saw, which it saw after we sent it.
        assert last_sent + 0.2 < time.monotonic() < last_sent + 2.0
        assert len(codes) > 10 and set(codes) == {grpc.StatusCode.UNAVAILABLE}


async def test_health_cli_exit_code_follows_the_status() -> None:
    from convlens.client._cli import main as cli_main
    async with InProcessServer() as srv:
        assert await asyncio.to_thread(cli_main, ["-s", srv.address, "health"]) == 0
        await srv.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert await asyncio.to_thread(cli_main, ["-s", srv.address, "health"]) == 1
        assert await asyncio.to_thread(cli_main, ["-s", srv.address, "health", "--service", "nope"]) == 1
