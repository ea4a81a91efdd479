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


# Trailers a default grpcio client accepts are 8 KB in all (metadata soft limit); the message travels twice
# (grpc-message and the details), so each part is cut well below that, whatever a caller's value was.
MESSAGE_LIMIT = 1000
DESCRIPTION_LIMIT = 400
FIELD_LIMIT = 120
VIOLATIONS_BUDGET = 3000  # characters of all field violations together


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit - 1]}…"


def bounded(message: str, violations: list[errors.FieldViolation]
            ) -> tuple[str, list[errors.FieldViolation]]:
    """`message` and `violations` cut to fit the trailers; violations beyond the budget are counted."""
    kept: list[errors.FieldViolation] = []
    used = 0
    for i, v in enumerate(violations):
        cut = errors.FieldViolation(_cut(v.field, FIELD_LIMIT), _cut(v.description, DESCRIPTION_LIMIT))
        used += len(cut.field) + len(cut.description)
        if used > VIOLATIONS_BUDGET:
            kept.append(errors.FieldViolation("…", f"{len(violations) - i} more violations not shown"))
            break
        kept.append(cut)
    return _cut(message, MESSAGE_LIMIT), kept


def to_status(exc: BaseException) -> grpc.Status:
    """The status a caller sees for `exc`. Unknown exceptions become INTERNAL without internals."""
    if isinstance(exc, TensorError):
        exc = errors.InvalidArgument(f"bad tensor: {exc}", field="tensor")
    if isinstance(exc, errors.ConvLensError):
        code = next(c for cls, c in CODES.items() if isinstance(exc, cls))
        message, violations = bounded(exc.message, exc.violations)
        reason = exc.reason
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
