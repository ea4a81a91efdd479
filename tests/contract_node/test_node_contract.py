"""The contract from a second language: a Node.js client built from proto/ alone calls every RPC of both
services of a test server (the streaming tests' tiny network) and prints JSON, checked here.

Node 20 and the npm packages (tests/contract_node/package-lock.json) are installed by `make test`
(`make node-deps`: npm ci). What the client loads from outside proto/ (googleapis' google/rpc protos, to decode
rich errors) and why protobufjs is named: tests/contract_node/README.md."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from google.rpc import error_details_pb2

from convlens.server.app import ConvLensServer
from tests.streaming.conftest import MODEL, tiny_server

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
# googleapis' google/rpc/*.proto ship inside googleapis-common-protos (a grpcio-status dependency): README.md.
GOOGLE_PROTOS = Path(error_details_pb2.__file__).parents[2]
LAYER = "stage1"


@pytest.fixture()
async def server() -> AsyncIterator[ConvLensServer]:
    async with tiny_server() as srv:
        yield srv


async def run_node(server: ConvLensServer) -> dict:
    node = shutil.which("node")
    assert node, "node (20+) is not on PATH: the contract test needs it (apt-get install nodejs)"
    assert (HERE / "node_modules" / "@grpc" / "grpc-js").is_dir(), \
        "tests/contract_node/node_modules is missing: run `make node-deps` (npm ci)"
    proc = await asyncio.create_subprocess_exec(
        node, str(HERE / "contract.js"), f"127.0.0.1:{server.port}", MODEL, LAYER, str(ROOT / "proto"),
        str(GOOGLE_PROTOS), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()  # the server answers on this loop while node runs
    assert proc.returncode == 0, err.decode()
    return json.loads(out)


async def test_every_rpc_and_rich_errors_from_node(server: ConvLensServer) -> None:
    r = await run_node(server)
    assert r["ListModels"] == {"models": [MODEL]}
    assert r["request_id_echo"] == "node-contract-1"
    assert r["GetModel"]["name"] == MODEL and r["GetModel"]["layers"] > 3
    assert r["GetModel"]["shape_of_layer"] == ["12", "8", "8"]  # int64 as strings in JS (the .proto says why)
    assert r["GetFilters"]["dtype"] == "DTYPE_FLOAT32" and r["GetFilters"]["shape"] == ["8", "3", "3", "3"]
    assert r["GetFilters"]["grid_png_bytes"] > 100
    assert r["ListDatasets"] == {"datasets": [{"name": "samples", "image_count": 19}]}
    assert len(r["TopActivations"]["sources"]) == 2 and r["TopActivations"]["channels"] == 12
    assert set(r["TopActivations"]["sources"]) <= {"images[0]", "images[1]", "images[2]"}
    assert r["Saliency"]["heatmap_shape"] == ["32", "32"] and r["Saliency"]["predictions"] == 5

    for name, steps in (("MaximizeUnit", 3), ("Dream", 4), ("StyleTransfer", 2)):
        s = r[name]
        assert s["error"] is None, (name, s["error"])
        assert s["progress_steps"] == list(range(1, steps + 1)) and s["results"] == 1 and s["image_png_bytes"] > 100
    # each objective value under one key; Dream's octave in its own field, not in the map
    assert r["MaximizeUnit"]["objective_keys"] == ["objective"]
    assert r["Dream"]["objective_keys"] == ["objective"] and r["Dream"]["octaves"] == [0, 0, 1, 1]
    assert r["StyleTransfer"]["objective_keys"] == ["content", "style", "total"]
    assert r["StyleTransfer"]["octaves"] == [None, None]
    # presence: an explicit 0 is honoured (seed 0, jitter 0) and echoed; an unset seed is drawn and reported
    assert r["Dream"]["settings"]["seed"] == "0" and r["Dream"]["settings"]["jitter"] == 0
    assert r["MaximizeUnit"]["settings"]["seed"] == "0"
    assert r["DreamUnsetSeed"]["settings"]["jitter"] == 32
    assert r["StyleTransfer"]["settings"]["seed"] == "3"

    # the second service: its index, and load/unload refused (this server runs without model control)
    assert r["RepositoryIndex"] == {"names": [MODEL], "states": ["MODEL_STATE_READY"]}
    for name in ("LoadModel", "UnloadModel"):
        assert (r[name]["error"]["code"], r[name]["error"]["reason"]) == ("FAILED_PRECONDITION", "MODEL_CONTROL_OFF")

    # rich errors: every violation, the ErrorInfo reason, the request id
    dream = r["DreamTwoBadFields"]["error"]
    assert dream["code"] == "INVALID_ARGUMENT" and dream["reason"] == "INVALID_ARGUMENT"
    assert dream["domain"] == "convlens.dev"
    assert [v["field"] for v in dream["violations"]] == ["steps_per_octave", "max_size"]
    assert r["DreamTwoBadFields"]["progress_steps"] == []  # refused before any compute
    style = r["StyleTwoBadFields"]["error"]
    assert [v["field"] for v in style["violations"]] == ["content", "style", "steps", "size"]
    saliency = r["SaliencyTwoBadFields"]["error"]
    assert (saliency["code"], saliency["reason"]) == ("INVALID_ARGUMENT", "INVALID_ARGUMENT")
    assert [v["field"] for v in saliency["violations"]] == ["smoothgrad.samples", "target.class_index"]
    missing = r["UnknownModel"]["error"]
    assert missing["code"] == "NOT_FOUND" and missing["reason"] == "MODEL_NOT_FOUND"
    assert [v["field"] for v in missing["violations"]] == ["model"]
    assert missing["request_id"] == "node-err-2"
