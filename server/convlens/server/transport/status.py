"""The one place that maps server-side errors to gRPC status codes (with google.rpc details).

Every error status carries a google.rpc.ErrorInfo (stable `reason`, domain DOMAIN) and, when fields were
wrong, a google.rpc.BadRequest with one field violation per bad field (the .proto's header says the same).
"""

from __future__ import annotations

import logging

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from convlens.server import errors
from convlens.wire.tensors import TensorError

log = logging.getLogger("convlens.server")

DOMAIN = "convlens.dev"

CODES: dict[type[errors.ConvLensError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Cancelled: grpc.StatusCode.CANCELLED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Unimplemented: grpc.StatusCode.UNIMPLEMENTED,
}


def to_status(exc: BaseException) -> grpc.Status:
    """The status a caller sees for `exc`. Unknown exceptions become INTERNAL without internals."""
    if isinstance(exc, TensorError):
        exc = errors.InvalidArgument(f"bad tensor: {exc}", field="tensor")
    if isinstance(exc, errors.ConvLensError):
        code = next(c for cls, c in CODES.items() if isinstance(exc, cls))
        message, violations, reason = exc.message, exc.violations, exc.reason
    else:
        log.exception("internal error", exc_info=exc)
        code, message, violations = grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__})", []
        reason = "INTERNAL"
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message)
    if violations:
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in violations
        ]))
        status.details.append(detail)
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN))
    status.details.append(info)
    return rpc_status.to_status(status)
