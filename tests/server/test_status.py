"""The server's one error map: every domain error has its code; field violations travel as BadRequest."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2

from convlens.server import errors
from convlens.server.transport.status import CODES, to_status
from convlens.wire.tensors import TensorError


def all_subclasses(cls: type) -> set[type]:
    out = set()
    for sub in cls.__subclasses__():
        out |= {sub, *all_subclasses(sub)}
    return out


def test_every_domain_error_maps_to_its_own_status_code() -> None:
    assert all_subclasses(errors.ConvLensError) == set(CODES)
    assert len(set(CODES.values())) == len(CODES)
    for cls, code in CODES.items():
        status = to_status(cls("boom"))
        assert status.code == code and status.details == "boom"


def test_field_violations_travel_as_bad_request_details() -> None:
    status = to_status(errors.InvalidArgument("channel 900 is out of range 0..111", field="target.unit.channel"))
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    (md_key, blob), = status.trailing_metadata
    assert md_key == "grpc-status-details-bin"
    from google.rpc import status_pb2

    rich = status_pb2.Status.FromString(blob)
    bad = error_details_pb2.BadRequest()
    assert rich.details[0].Unpack(bad)
    assert [(v.field, v.description) for v in bad.field_violations] == [
        ("target.unit.channel", "channel 900 is out of range 0..111")]


def test_unknown_exceptions_become_internal_without_leaking_internals() -> None:
    status = to_status(RuntimeError("secret path /home/x"))
    assert status.code == grpc.StatusCode.INTERNAL and "secret" not in status.details


def test_bad_tensors_are_invalid_arguments() -> None:
    status = to_status(TensorError("shape [2] of float32 needs 8 bytes, got 3"))
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT and "8 bytes" in status.details


def _details(status: grpc.Status) -> dict[str, object]:
    from google.rpc import status_pb2

    (_, blob), = status.trailing_metadata
    out: dict[str, object] = {}
    for detail in status_pb2.Status.FromString(blob).details:
        for kind in (error_details_pb2.BadRequest, error_details_pb2.ErrorInfo):
            message = kind()
            if detail.Unpack(message):
                out[kind.__name__] = message
    return out


def test_every_error_carries_an_error_info_with_a_stable_reason() -> None:
    cases = [
        (errors.NotFound("no model 'x'", field="model", reason="MODEL_NOT_FOUND"), "MODEL_NOT_FOUND"),
        (errors.InvalidArgument("bad", field="k"), "INVALID_ARGUMENT"),
        (errors.ResourceExhausted("busy", reason="QUEUE_FULL"), "QUEUE_FULL"),
        (errors.Unavailable("bye"), "UNAVAILABLE"),
        (RuntimeError("secret"), "INTERNAL"),
    ]
    for exc, reason in cases:
        info = _details(to_status(exc))["ErrorInfo"]
        assert (info.reason, info.domain) == (reason, "convlens.dev"), exc  # type: ignore[attr-defined]


def test_violations_gathers_every_bad_field_into_one_answer() -> None:
    v = errors.Violations()
    v.check(True, "size", "never reported")
    v.check(False, "steps", "steps = 0 is out of range (1..2000)")
    v.collect(lambda: (_ for _ in ()).throw(errors.InvalidArgument("size = 5 is too small", field="size")))
    with pytest.raises(errors.InvalidArgument) as caught:
        v.raise_if_any()
    found = _details(to_status(caught.value))
    assert [(f.field, f.description) for f in found["BadRequest"].field_violations] == [  # type: ignore[attr-defined]
        ("steps", "steps = 0 is out of range (1..2000)"), ("size", "size = 5 is too small")]
    assert "and 1 more" in caught.value.message
    errors.Violations().raise_if_any()  # none gathered: no error
