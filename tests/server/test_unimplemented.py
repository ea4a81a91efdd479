"""RPCs a servicer does not define answer UNIMPLEMENTED from one place, unary and streaming alike."""

from __future__ import annotations

import pytest

from convlens.server.errors import Unimplemented
from convlens.server.transport.servicer import InspectionServicer
from convlens.server.transport.unimplemented import answer_unimplemented
from convlens.v1 import convlens_pb2 as pb
from convlens.v1 import convlens_pb2_grpc as pb_grpc

SERVICE = pb.DESCRIPTOR.services_by_name["InspectionService"]


@answer_unimplemented(SERVICE)
class OnlyCatalog(pb_grpc.InspectionServiceServicer):
    async def ListModels(self, request: pb.ListModelsRequest, context: object) -> pb.ListModelsResponse:
        return pb.ListModelsResponse()


async def test_a_missing_unary_rpc_raises_unimplemented_naming_it_and_what_exists() -> None:
    with pytest.raises(Unimplemented) as e:
        await OnlyCatalog().GetModel(pb.GetModelRequest(), None)
    assert "GetModel" in e.value.message and "available now: ListModels" in e.value.message


async def test_a_missing_streaming_rpc_raises_on_its_first_event() -> None:
    stream = OnlyCatalog().StyleTransfer(pb.StyleTransferRequest(), None)
    with pytest.raises(Unimplemented) as e:
        await anext(stream)
    assert "StyleTransfer" in e.value.message


async def test_a_defined_rpc_is_left_alone() -> None:
    assert await OnlyCatalog().ListModels(pb.ListModelsRequest(), None) == pb.ListModelsResponse()


def test_the_real_servicer_has_a_handler_for_every_rpc_of_the_contract() -> None:
    for method in SERVICE.methods:
        assert callable(getattr(InspectionServicer, method.name)), method.name
