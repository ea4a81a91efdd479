"""Model control end to end, in process (real scheduler, services, servicer, interceptor; tiny TorchScript
folders): explicit mode's load / reload / unload while the server serves, versions, and calls in flight."""

from __future__ import annotations

import asyncio
import gc
import json
import threading
import urllib.request
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
import torch
from google.protobuf import json_format
from torch import nn

from convlens.client import AsyncClient, FailedPreconditionError, NotFoundError
from convlens.client._cli import main as cli
from convlens.server.app import ConvLensServer
from convlens.server.config import ServerConfig
from convlens.server.models.catalog import build_catalog
from convlens.server.models.model import Preprocess, ServedModel
from convlens.server.models.repository import ModelRepository
from convlens.v1 import convlens_pb2 as pb
from convlens.v1 import convlens_pb2_grpc as pb_grpc
from tests.models.tiny_folders import copy_in, image, logit, variant_of, write_folder
from tests.reliability.test_warm_up import expected_lanes

PIXELS = image(0)


def config(root: Path, **changes: object) -> ServerConfig:
    return ServerConfig(host="127.0.0.1", port=0, metrics=False, embedded=False, device="cpu", grace_seconds=0.0,
                        model_repo=root, model_control="explicit", **changes)  # type: ignore[arg-type]


@asynccontextmanager
async def started(srv: ConvLensServer) -> AsyncIterator[AsyncClient]:
    await srv.start()
    try:
        async with AsyncClient(f"127.0.0.1:{srv.port}", timeout=60) as c:
            yield c
    finally:
        await srv.stop(0.0)


def loaded_gauge(srv: ConvLensServer, model: str) -> float | None:
    return srv.metrics.registry.get_sample_value("convlens_model_loaded", {"model": model, "format": "torchscript"})


def http_post(port: int, method: str, body: dict[str, object]) -> object:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/convlens.v1.ModelRepositoryService/{method}",
                                     data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


async def answer(c: AsyncClient, model: str) -> tuple[int, float]:
    """(the variant whose labels came back, the class-0 logit): both from one copy, or the test fails."""
    s = await c.saliency(PIXELS, model, target=0, method="gradient", overlay=False)
    return variant_of([p.label for p in s.predictions]), s.target_value


async def test_explicit_mode_lists_loads_versions_and_unloads(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "repo"
    write_folder(root / "alpha", 1)
    (root / "broken").mkdir()
    (root / "broken" / "model.toml").write_text('format = "torchscript"\nfile = "missing.pt"\n')
    srv = ConvLensServer(config(root, http_port=0))
    async with started(srv) as c:
        index = {(e.name, e.version): e for e in await c.repository_index()}
        # The HTTP front serves the same service from the contract (POST /<package>.<Service>/<Method>).
        over_http = await asyncio.to_thread(http_post, srv.http_port, "RepositoryIndex", {"readyOnly": True})
        assert over_http == {"models": [{"name": "alpha", "version": 1, "state": "MODEL_STATE_READY",
                                         "source": "repository", "defaultVersion": True}],
                             "modelControl": "explicit"}
        assert index[("alpha", 1)].state == "READY" and index[("alpha", 1)].default
        assert index[("broken", 1)].state == "UNAVAILABLE"
        assert "'missing.pt' not found" in index[("broken", 1)].reason
        assert [e.name for e in await c.repository_index(ready_only=True)] == ["alpha"]

        # A versioned folder copied into the running server's repository: listed, not served until loaded.
        write_folder(tmp_path / "beta-src" / "1", 2)
        copy_in(tmp_path / "beta-src", root / "beta")
        entry = {(e.name, e.version): e for e in await c.repository_index()}[("beta", 1)]
        assert (entry.state, entry.reason) == ("UNAVAILABLE", "not loaded")
        with pytest.raises(NotFoundError):
            await c.saliency(PIXELS, "beta", target=0)
        assert [(e.version, e.state) for e in await c.load_model("beta")] == [(1, "READY")]
        variant, value = await answer(c, "beta")
        assert variant == 2 and value == pytest.approx(logit(2, PIXELS), abs=1e-4)
        assert loaded_gauge(srv, "beta") == 1

        # Version 2 beside it: calls naming no version go to the highest; NAME@VERSION picks one.
        write_folder(tmp_path / "beta-2", 3)
        copy_in(tmp_path / "beta-2", root / "beta" / "2")
        entries = await c.load_model("beta", version=2)
        assert [(e.version, e.state, e.default) for e in entries] == [(1, "READY", False), (2, "READY", True)]
        assert (await answer(c, "beta"))[0] == 3
        assert (await answer(c, "beta@1"))[0] == 2
        assert (await c.get_model("beta@1")).info.version == 1
        assert {m.name: m.version for m in await c.list_models()}["beta"] == 2
        assert loaded_gauge(srv, "beta") == 2
        with pytest.raises(NotFoundError) as err:
            await c.saliency(PIXELS, "beta@7", target=0)
        assert "no version 7" in err.value.message

        # Unload one version, then the model: NOT_FOUND for new calls, the gauge follows, and the unloaded copy
        # (with the workers' replicas of it) is freed once nothing runs on it.
        assert srv.repository is not None
        copy = weakref.ref(srv.repository.get("beta@2"))
        assert copy() is not None and copy().lane_replicas  # type: ignore[union-attr]  # it computed above
        await c.unload_model("beta", version=2)
        gc.collect()
        assert copy() is None, gc.get_referrers(copy())
        assert (await answer(c, "beta"))[0] == 2
        entries = await c.unload_model("beta")
        assert [(e.version, e.state, e.reason) for e in entries] == [(1, "UNAVAILABLE", "unloaded"),
                                                                    (2, "UNAVAILABLE", "unloaded")]
        with pytest.raises(NotFoundError):
            await c.saliency(PIXELS, "beta", target=0)
        assert loaded_gauge(srv, "beta") == 0

        # What cannot be done says why.
        with pytest.raises(NotFoundError) as err:
            await c.load_model("gamma")
        assert err.value.field_violations[0].field == "model"
        with pytest.raises(FailedPreconditionError) as err:
            await c.load_model("broken")
        assert "'missing.pt' not found" in err.value.message
        assert err.value.reason == "MODEL_LOAD_FAILED"
        with pytest.raises(NotFoundError):
            await c.unload_model("beta")
        assert (await answer(c, "alpha"))[0] == 1  # the other model served throughout

        # The CLI: `convlens repository load/unload/list` print the index lines the calls answer.
        capsys.readouterr()
        server = ["-s", f"127.0.0.1:{srv.port}", "repository"]
        assert await asyncio.to_thread(cli, [*server, "load", "beta", "--version", "1"]) == 0
        rows = [line.split() for line in capsys.readouterr().out.splitlines()]
        assert rows[0][:3] == ["NAME", "VERSION", "STATE"] and ["beta", "1", "READY"] == rows[1][:3]
        assert (await answer(c, "beta"))[0] == 2
        assert await asyncio.to_thread(cli, [*server, "unload", "beta@1"]) == 0
        assert ["beta", "1", "UNAVAILABLE"] == capsys.readouterr().out.splitlines()[1].split()[:3]
        with pytest.raises(NotFoundError):
            await c.saliency(PIXELS, "beta", target=0)
        assert await asyncio.to_thread(cli, [*server, "unload", "beta"]) == 1
        assert "error: NOT_FOUND" in capsys.readouterr().err
        assert await asyncio.to_thread(cli, [*server, "list", "--ready"]) == 0
        assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]] == ["alpha"]

        # LoadModel and UnloadModel over HTTP answer what they answer over gRPC, in the same state.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
            stub = pb_grpc.ModelRepositoryServiceStub(channel)
            for load, version in ((True, None), (False, 2), (True, 2), (False, None)):
                named = {} if version is None else {"version": version}
                request = (pb.LoadModelRequest if load else pb.UnloadModelRequest)(model="beta", **named)
                undo = (pb.UnloadModelRequest if load else pb.LoadModelRequest)(model="beta", **named)
                method = "LoadModel" if load else "UnloadModel"
                by_http = await asyncio.to_thread(http_post, srv.http_port, method,
                                                  json_format.MessageToDict(request))
                await (stub.UnloadModel(undo) if load else stub.LoadModel(undo))  # back to the state before
                by_grpc = await getattr(stub, method)(request)
                assert json_format.ParseDict(by_http, type(by_grpc)()) == by_grpc, (method, version)
                assert len(by_grpc.models) == 2


async def test_a_load_shows_loading_and_answers_once_the_new_copy_is_warm(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While a folder is read the index says LOADING (with the reason: a first load, or a reload while the
    old copy serves); LoadModel answers only after every lane's replica of the new copy is made, and the
    first calls after it run on those replicas (none is made for them)."""
    root = tmp_path / "repo"
    write_folder(root / "alpha", 1)
    srv = ConvLensServer(config(root))
    async with started(srv) as c:
        assert srv.repository is not None
        entered, gate = threading.Event(), threading.Event()
        read = srv.repository.read

        def blocked_read(name: str, versions: object = None) -> object:
            entered.set()
            assert gate.wait(60), "the test never let the read go on"
            return read(name, versions)  # type: ignore[arg-type]

        monkeypatch.setattr(srv.repository, "read", blocked_read)

        async def while_read(load: asyncio.Task[object], serving: int | None = None) -> tuple[str, str]:
            """The index line of delta@1 while its folder is read (and the variant served then)."""
            assert await asyncio.to_thread(entered.wait, 60)  # the folder is being read
            entry = {(e.name, e.version): e for e in await c.repository_index()}[("delta", 1)]
            if serving is not None:
                assert (await answer(c, "delta"))[0] == serving
            assert not load.done()
            entered.clear()
            gate.set()
            await load
            gate.clear()
            return entry.state, entry.reason

        copy_in(write_folder(tmp_path / "delta-src", 1), root / "delta")
        state = await while_read(asyncio.create_task(c.load_model("delta")))
        assert state == ("LOADING", "loading")
        first = srv.repository.get("delta")
        warmed = dict(first.lane_replicas)
        assert set(warmed) == expected_lanes(srv.config)  # made before LoadModel answered
        assert (await answer(c, "delta"))[0] == 1
        assert first.lane_replicas == warmed and all(first.lane_replicas[k] is r for k, r in warmed.items())

        write_folder(root / "delta", 2)  # rewritten in place, then reloaded
        state = await while_read(asyncio.create_task(c.load_model("delta")), serving=1)
        assert state[0] == "LOADING" and state[1].startswith("reloading: the copy loaded before serves")
        second = srv.repository.get("delta")
        assert second is not first and set(second.lane_replicas) == expected_lanes(srv.config)
        warmed = dict(second.lane_replicas)
        assert (await answer(c, "delta"))[0] == 2
        assert all(second.lane_replicas[k] is r for k, r in warmed.items())


async def test_reload_under_load_loses_no_call_and_mixes_no_copies(tmp_path: Path) -> None:
    """8 callers call Saliency while the folder is rewritten (new weights, labels and normalisation) and
    reloaded: every call answers, each answer comes from one copy (its labels and its logit agree), and every
    call that starts after the reload returned gets the new copy."""
    root = tmp_path / "repo"
    write_folder(root / "gamma", 1)
    srv = ConvLensServer(config(root))
    async with started(srv) as c:
        answers: list[list[tuple[int, int, float]]] = [[] for _ in range(8)]  # (phase at start, variant, logit)
        phase = [1]
        stop = asyncio.Event()
        progress = asyncio.Condition()

        async def caller(mine: list[tuple[int, int, float]]) -> None:
            while not stop.is_set():
                started_in = phase[0]
                variant, value = await answer(c, "gamma")
                mine.append((started_in, variant, value))
                async with progress:
                    progress.notify_all()

        async def until(done: object) -> None:
            async with progress:
                await asyncio.wait_for(progress.wait_for(done), 120)  # type: ignore[arg-type]

        callers = [asyncio.create_task(caller(a)) for a in answers]
        await until(lambda: all(len(a) >= 2 for a in answers))
        write_folder(root / "gamma", 2)  # the same version, rewritten in place
        await c.load_model("gamma")
        phase[0] = 2
        await until(lambda: all(sum(p == 2 for p, _, _ in a) >= 2 for a in answers))
        stop.set()
        await asyncio.gather(*callers)  # a failed call would raise here

        flat = [x for a in answers for x in a]
        expected = {1: logit(1, PIXELS), 2: logit(2, PIXELS)}
        assert expected[1] != pytest.approx(expected[2], abs=1e-3)  # the copies are told apart
        for _, variant, value in flat:
            assert value == pytest.approx(expected[variant], abs=1e-4), "an answer mixes two copies"
        assert all(variant == 2 for p, variant, _ in flat if p == 2), "a call after the reload got the old copy"
        assert {v for _, v, _ in flat} == {1, 2}
        assert loaded_gauge(srv, "gamma") == 1


# A model whose forward waits at a gate: a call is in flight for as long as the test wants. The events live
# at module level because the workers deep-copy modules (an Event cannot be copied).
ENTERED, GATE = threading.Event(), threading.Event()
GATED = threading.Event()  # off while the catalog is built


class GatedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        self.fc = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if GATED.is_set():
            ENTERED.set()
            assert GATE.wait(60), "the test never opened the gate"
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def gated_server(tmp_path: Path) -> ConvLensServer:
    module = GatedNet().eval()
    pre = Preprocess(16, 16, 16, (0.5,) * 3, (0.25,) * 3)
    model = ServedModel(name="gated", format="torchscript", module=module, preprocess=pre, labels=["a", "b"],
                        supports_gradients=True, layers=build_catalog(module, pre))
    (tmp_path / "repo").mkdir()
    # No warm-up run at start-up: the gated forward would enter (and wait at) the gate before any call does.
    return ConvLensServer(config(tmp_path / "repo", warm_up=False),
                          repository=ModelRepository([model], root=tmp_path / "repo"))


async def test_unload_refuses_new_calls_while_calls_in_flight_finish(tmp_path: Path) -> None:
    srv = gated_server(tmp_path)
    ENTERED.clear(), GATE.clear(), GATED.set()
    try:
        async with started(srv) as c:
            in_flight = asyncio.create_task(c.saliency(PIXELS, "gated", target=1, overlay=False))
            assert await asyncio.to_thread(ENTERED.wait, 60)  # the call is computing on the gated copy
            await c.unload_model("gated")
            with pytest.raises(NotFoundError):
                await c.saliency(PIXELS, "gated", target=1)
            GATE.set()
            s = await in_flight
            assert [p.label for p in s.predictions] == ["b", "a"] or [p.label for p in s.predictions] == ["a", "b"]
            assert s.attribution.shape == (3, 16, 16)
    finally:
        GATED.clear()
        GATE.set()


async def test_an_optimisation_job_keeps_its_copy_through_an_unload(tmp_path: Path) -> None:
    """MaximizeUnit's steps run on the copy the job started with: the model unloaded after its first step
    began, the job still runs every step and answers."""
    srv = gated_server(tmp_path)
    ENTERED.clear(), GATE.clear(), GATED.set()
    try:
        async with started(srv) as c:
            job = asyncio.create_task(c.maximize_unit("gated", 1, steps=4, seed=0))
            assert await asyncio.to_thread(ENTERED.wait, 60)  # its first step is computing
            await c.unload_model("gated")
            with pytest.raises(NotFoundError):
                await c.maximize_unit("gated", 1, steps=4)
            GATE.set()
            result = await job
            assert result.settings is not None and result.settings["steps"] == 4
            assert [p.label for p in result.predictions] in (["a", "b"], ["b", "a"])
    finally:
        GATED.clear()
        GATE.set()
