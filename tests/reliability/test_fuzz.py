"""Fuzzing every RPC (issue #15), the suite's short version: derandomised Hypothesis examples of generated
requests against a three-model server (tools/reliability/fuzz.py holds the properties; `make fuzz` runs
10,000 calls). Every answer is OK or a documented status naming its field, ends by its deadline, and the
server is idle and SERVING after every batch."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from convlens.server.launcher import ServerProcess
from convlens.v1 import convlens_pb2 as pb
from convlens.v1 import convlens_pb2_grpc as pb_grpc
from tools.reliability.fuzz import DOCUMENTED, RPCS, Fuzzer, discover, run_rpc
from tools.reliability.strategies import Requests
from tools.reliability.tiny import MODEL

pytestmark = pytest.mark.slow

# Calls per RPC: arbitrary requests (refused in milliseconds, mostly) in batches of up to 8, and a share of
# plausible ones that compute. Requests without fields (ListModels, ListDatasets) get a few.
EXAMPLES = {"ListModels": 4, "ListDatasets": 4, "GetModel": 40, "GetFilters": 40, "TopActivations": 30,
            "Saliency": 20, "MaximizeUnit": 30, "Dream": 25, "StyleTransfer": 12}


@pytest.fixture(scope="module")
def fuzz_target(tiny_server: ServerProcess) -> tuple[ServerProcess, Requests]:
    return tiny_server, Requests(asyncio.run(discover(tiny_server.address)))


def test_every_rpc_is_fuzzed() -> None:
    assert set(EXAMPLES) == set(RPCS)


@pytest.mark.parametrize("rpc", RPCS)
def test_fuzzed_requests_get_documented_answers(fuzz_target: tuple[ServerProcess, Requests], rpc: str) -> None:
    server, requests = fuzz_target
    loop = asyncio.new_event_loop()
    fuzzer = Fuzzer(server.address, server.metrics_url)
    try:
        run_rpc(fuzzer, loop, requests, rpc, examples=EXAMPLES[rpc], per_batch=8, derandomize=True, plausible=0.2)
    finally:
        loop.run_until_complete(fuzzer.close())
        loop.close()
    codes = {code for (_, code) in fuzzer.histogram}
    assert fuzzer.calls >= EXAMPLES[rpc] and not fuzzer.failures
    assert codes <= {c.name for c in DOCUMENTED}
    if rpc not in ("ListModels", "ListDatasets"):
        # the campaign reached both sides: refusals and answers that computed
        assert "INVALID_ARGUMENT" in codes or "NOT_FOUND" in codes, fuzzer.histogram


def test_top_activations_on_a_torchscript_layer_is_a_failed_precondition_not_internal(
        fuzz_target: tuple[ServerProcess, Requests]) -> None:
    """Found by the fuzzer: hooks on a layer inside TorchScript code raised a bare RuntimeError (INTERNAL)."""
    import numpy as np

    from tools.reliability.strategies import png

    server, _ = fuzz_target
    image = pb.Image(encoded=png(np.zeros((40, 40, 3), dtype=np.uint8)))
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.InspectionServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.TopActivations(pb.TopActivationsRequest(model=MODEL, layer="conv2", k=1, images=[image]), timeout=60)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, info.value.details()
    assert "TorchScript" in info.value.details()
