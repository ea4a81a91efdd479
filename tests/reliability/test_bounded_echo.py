"""Bounded echo: a caller's value is quoted in messages and details only in part, so that a huge name still
answers its precise status at grpcio's default limits (8 KB of trailers), not 'metadata size exceeds'."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from convlens.server import errors
from convlens.server.transport.status import to_status
from convlens.v1 import convlens_pb2 as pb
from convlens.v1 import convlens_pb2_grpc as pb_grpc
from tools.reliability.tiny import MODEL as TINY

HUGE = "x" * 100_000


def details(err: grpc.RpcError) -> error_details_pb2.BadRequest:
    blob = dict(err.trailing_metadata() or ())["grpc-status-details-bin"]
    bad = error_details_pb2.BadRequest()
    assert status_pb2.Status.FromString(blob).details[0].Unpack(bad)
    return bad


@pytest.mark.parametrize("call", [
    lambda s: s.GetModel(pb.GetModelRequest(model=HUGE), timeout=30),
    lambda s: s.GetFilters(pb.GetFiltersRequest(model=HUGE, layer="conv1"), timeout=30),
    lambda s: s.Saliency(pb.SaliencyRequest(model=HUGE), timeout=30),
    lambda s: list(s.MaximizeUnit(pb.MaximizeUnitRequest(model=HUGE), timeout=30)),
], ids=["GetModel", "GetFilters", "Saliency", "MaximizeUnit"])
def test_a_100000_character_model_name_answers_not_found_at_default_limits(
        stub: pb_grpc.InspectionServiceStub, call) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        call(stub)
    err = info.value
    assert err.code() == grpc.StatusCode.NOT_FOUND, err.details()
    assert "no model 'xxxx" in err.details() and "(100000 chars)" in err.details()
    assert len(err.details()) < 1000
    assert [v.field for v in details(err).field_violations] == ["model"]


def test_a_100000_character_layer_name_answers_not_found_at_default_limits(
        stub: pb_grpc.InspectionServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.GetFilters(pb.GetFiltersRequest(model=TINY, layer=HUGE), timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND, info.value.details()
    assert "(100000 chars)" in info.value.details()
    assert [v.field for v in details(info.value).field_violations] == ["layer"]


def test_a_100000_character_dataset_name_answers_not_found_at_default_limits(
        stub: pb_grpc.InspectionServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.TopActivations(pb.TopActivationsRequest(model=TINY, layer="conv1", dataset=HUGE, k=1), timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND, info.value.details()
    assert [v.field for v in details(info.value).field_violations] == ["dataset"]


def test_the_status_map_bounds_any_message_and_any_number_of_violations() -> None:
    """The safety net behind `errors.echo`: whatever a message was built from, the trailers stay small."""
    many = [errors.FieldViolation(f"objectives[{i}]", "y" * 5000) for i in range(1000)]
    status = to_status(errors.InvalidArgument("z" * 100_000, violations=many))
    total = sum(len(k) + len(v) for k, v in status.trailing_metadata) + len(status.details)
    assert total < 8000
    blob = dict(status.trailing_metadata)["grpc-status-details-bin"]
    bad = error_details_pb2.BadRequest()
    status_pb2.Status.FromString(blob).details[0].Unpack(bad)
    assert bad.field_violations[0].field == "objectives[0]"
    assert bad.field_violations[-1].description.endswith("more violations not shown")


def test_echo_quotes_short_values_whole_and_cuts_long_ones() -> None:
    assert errors.echo("conv1") == "'conv1'"
    cut = errors.echo("a" * 500)
    assert cut.startswith("'aaa") and cut.endswith("… (500 chars)") and len(cut) < 100
