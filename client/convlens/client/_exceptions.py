"""The SDK's one exception tree, and the one function that maps gRPC errors into it.

    ConvLensError                      .code (grpc.StatusCode), .message, .field_violations, .reason
     ├── InvalidArgumentError          INVALID_ARGUMENT   a request field is wrong (see field_violations)
     ├── NotFoundError                 NOT_FOUND          unknown model, layer or dataset
     ├── FailedPreconditionError       FAILED_PRECONDITION e.g. gradients on a forward-only ONNX model
     ├── ResourceExhaustedError        RESOURCE_EXHAUSTED server queue full, image or message too large
     ├── DeadlineExceededError         DEADLINE_EXCEEDED  the call's timeout passed
     ├── RequestCancelledError         CANCELLED          (not asyncio.CancelledError, which it would shadow)
     ├── UnavailableError              UNAVAILABLE        server down, unreachable or shutting down
     ├── UnimplementedError            UNIMPLEMENTED      an RPC this server does not offer yet
     ├── InternalError                 INTERNAL           a server bug
     ├── PermissionDeniedError         PERMISSION_DENIED
     ├── UnauthenticatedError          UNAUTHENTICATED    missing or wrong token
     └── UnknownError                  every other code   (UNKNOWN, ABORTED, OUT_OF_RANGE, ALREADY_EXISTS,
                                                           DATA_LOSS: ConvLens never sends them on purpose)

Local mistakes (an unknown method name, an image of the wrong shape) raise ValueError/TypeError before any
call is made; only what the server (or the channel) answered becomes a ConvLensError.
"""

from __future__ import annotations

from typing import NamedTuple, cast

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

__all__ = [
    "ConvLensError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "FieldViolation",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "RequestCancelledError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "UnknownError",
]


class FieldViolation(NamedTuple):
    """One bad field from the google.rpc.BadRequest detail; `field` is a proto path ("target.unit.layer")."""

    field: str
    description: str


class ConvLensError(Exception):
    """Base of every error the server (or the channel to it) reported."""

    def __init__(self, message: str, *, code: grpc.StatusCode = grpc.StatusCode.UNKNOWN,
                 field_violations: list[FieldViolation] | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field_violations: list[FieldViolation] = list(field_violations or [])
        # google.rpc.ErrorInfo.reason: a stable machine-readable cause ("MODEL_NOT_FOUND", "QUEUE_FULL", ...);
        # "" when the server sent none.
        self.reason = reason

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.message}"
        for v in self.field_violations:
            text += f"\n  {v.field}: {v.description}"
        return text

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code.name}, message={self.message!r})"


class InvalidArgumentError(ConvLensError):
    pass


class NotFoundError(ConvLensError):
    pass


class FailedPreconditionError(ConvLensError):
    pass


class ResourceExhaustedError(ConvLensError):
    pass


class DeadlineExceededError(ConvLensError):
    pass


class RequestCancelledError(ConvLensError):
    pass


class UnavailableError(ConvLensError):
    pass


class UnimplementedError(ConvLensError):
    pass


class InternalError(ConvLensError):
    pass


class PermissionDeniedError(ConvLensError):
    pass


class UnauthenticatedError(ConvLensError):
    pass


class UnknownError(ConvLensError):
    pass


_BY_CODE: dict[grpc.StatusCode, type[ConvLensError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.CANCELLED: RequestCancelledError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
    grpc.StatusCode.INTERNAL: InternalError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
}


def _rich_details(err: grpc.RpcError) -> tuple[list[FieldViolation], str]:
    """(field violations, ErrorInfo reason) from the status details.

    Rich details ride in the grpc-status-details-bin trailer. A malformed or mismatched trailer must
    never hide the real error, so any decoding problem just means "no details"."""
    try:
        # from_call reads trailing_metadata(), code() and details(): a failed sync call's RpcError is its Call,
        # and grpc.aio's AioRpcError has the same three methods (it is no grpc.Call, hence the cast).
        status = rpc_status.from_call(cast(grpc.Call, err))
    except Exception:
        return [], ""
    if status is None:
        return [], ""
    out: list[FieldViolation] = []
    reason = ""
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out.extend(FieldViolation(v.field, v.description) for v in bad.field_violations)
        elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
    return out, reason


def _map_rpc_error(err: grpc.RpcError) -> ConvLensError:
    """The one place a gRPC error (sync or aio) becomes a ConvLensError; every call site uses it."""
    code_fn = getattr(err, "code", None)
    code = code_fn() if callable(code_fn) else None
    if not isinstance(code, grpc.StatusCode):
        # An RpcError that is not a finished call (rare: raised by the channel itself).
        return UnknownError(str(err) or type(err).__name__)
    details_fn = getattr(err, "details", None)
    message = (details_fn() if callable(details_fn) else None) or ""
    cls = _BY_CODE.get(code, UnknownError)
    violations, reason = _rich_details(err)
    return cls(message, code=code, field_violations=violations, reason=reason)
