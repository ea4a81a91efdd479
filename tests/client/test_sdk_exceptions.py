"""The exception tree: every status code has a class, and rich details survive the mapping."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

import convlens.client as cl
from convlens.client._exceptions import _BY_CODE, _map_rpc_error

EXPECTED = {
    grpc.StatusCode.INVALID_ARGUMENT: cl.InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: cl.NotFoundError,
    grpc.StatusCode.FAILED_PRECONDITION: cl.FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: cl.ResourceExhaustedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: cl.DeadlineExceededError,
    grpc.StatusCode.CANCELLED: cl.RequestCancelledError,
    grpc.StatusCode.UNAVAILABLE: cl.UnavailableError,
    grpc.StatusCode.UNIMPLEMENTED: cl.UnimplementedError,
    grpc.StatusCode.INTERNAL: cl.InternalError,
    grpc.StatusCode.PERMISSION_DENIED: cl.PermissionDeniedError,
    grpc.StatusCode.UNAUTHENTICATED: cl.UnauthenticatedError,
    grpc.StatusCode.UNKNOWN: cl.UnknownError,
    grpc.StatusCode.ABORTED: cl.UnknownError,
    grpc.StatusCode.ALREADY_EXISTS: cl.UnknownError,
    grpc.StatusCode.OUT_OF_RANGE: cl.UnknownError,
    grpc.StatusCode.DATA_LOSS: cl.UnknownError,
}


class FakeRpcError(grpc.RpcError):
    """What a failed call raises: an RpcError that is also a Call (code, details, trailing metadata)."""

    def __init__(self, code: grpc.StatusCode, details: str = "boom", trailing: Any = ()) -> None:
        self._code, self._details, self._trailing = code, details, trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> Any:
        return self._trailing


def _rich(code: grpc.StatusCode, message: str, violations: list[tuple[str, str]]) -> FakeRpcError:
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.BadRequest(field_violations=[
        error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in violations]))
    status = status_pb2.Status(code=code.value[0], message=message, details=[detail])
    return FakeRpcError(code, message, (("grpc-status-details-bin", status.SerializeToString()),))


def test_every_status_code_maps_to_a_specific_class() -> None:
    for code in grpc.StatusCode:
        if code is grpc.StatusCode.OK:
            continue
        err = _map_rpc_error(FakeRpcError(code, f"{code.name} happened"))
        assert type(err) is EXPECTED[code], code
        assert type(err) is not cl.ConvLensError and isinstance(err, cl.ConvLensError)
        assert err.code is code and err.message == f"{code.name} happened" and err.field_violations == []
    assert set(_BY_CODE.values()) | {cl.UnknownError} == set(EXPECTED.values())


def test_field_violations_are_decoded() -> None:
    err = _map_rpc_error(_rich(grpc.StatusCode.INVALID_ARGUMENT, "bad", [("image", "empty"), ("k", "< 0")]))
    assert isinstance(err, cl.InvalidArgumentError)
    assert err.field_violations == [cl.FieldViolation("image", "empty"), cl.FieldViolation("k", "< 0")]
    assert str(err) == "INVALID_ARGUMENT: bad\n  image: empty\n  k: < 0"


def test_error_info_reason_is_exposed() -> None:
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason="MODEL_NOT_FOUND", domain="convlens.dev"))
    status = status_pb2.Status(code=grpc.StatusCode.NOT_FOUND.value[0], message="no model 'x'", details=[info])
    err = _map_rpc_error(FakeRpcError(grpc.StatusCode.NOT_FOUND, "no model 'x'",
                                      (("grpc-status-details-bin", status.SerializeToString()),)))
    assert isinstance(err, cl.NotFoundError) and err.reason == "MODEL_NOT_FOUND"
    assert _map_rpc_error(FakeRpcError(grpc.StatusCode.NOT_FOUND, "plain")).reason == ""


def test_a_broken_details_trailer_never_hides_the_error() -> None:
    mismatched = _rich(grpc.StatusCode.NOT_FOUND, "other message", [("model", "x")])
    mismatched._details = "the real message"
    err = _map_rpc_error(mismatched)
    assert isinstance(err, cl.NotFoundError) and err.message == "the real message"
    assert err.field_violations == []
    garbage = FakeRpcError(grpc.StatusCode.INTERNAL, "x", (("grpc-status-details-bin", b"\xff\x00junk"),))
    assert isinstance(_map_rpc_error(garbage), cl.InternalError)


def test_an_rpc_error_that_is_not_a_call() -> None:
    err = _map_rpc_error(grpc.RpcError("channel closed"))
    assert isinstance(err, cl.UnknownError) and err.code is grpc.StatusCode.UNKNOWN


def test_request_cancelled_does_not_shadow_asyncio() -> None:
    import asyncio

    assert not issubclass(cl.RequestCancelledError, asyncio.CancelledError)
    with pytest.raises(cl.ConvLensError):
        raise cl.RequestCancelledError("x", code=grpc.StatusCode.CANCELLED)
