"""Domain errors of the server side. No grpc here: transport/status.py maps them to status codes.

    ConvLensError
     ├── InvalidArgument      (bad field; carries field violations)
     ├── NotFound             (unknown model / layer / dataset)
     ├── PermissionDenied     (a known caller without the right, e.g. model control without admin)
     ├── FailedPrecondition   (e.g. gradients on a forward-only ONNX model)
     ├── ResourceExhausted    (queue full, image too large)
     ├── DeadlineExceeded     (deadline passed before compute)
     ├── Cancelled            (caller went away before compute)
     ├── Unavailable          (server shutting down)
     └── Unimplemented        (an RPC whose issue has not landed)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class ConvLensError(Exception):
    """Base of every error the server reports to a caller on purpose."""

    def __init__(self, message: str, *, violations: list[FieldViolation] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.violations = list(violations or [])


class InvalidArgument(ConvLensError):
    """A request field is wrong. `field` names it (proto field path, e.g. "target.unit.layer")."""

    def __init__(self, message: str, *, field: str | None = None,
                 violations: list[FieldViolation] | None = None) -> None:
        vs = list(violations or [])
        if field is not None:
            vs.insert(0, FieldViolation(field, message))
        super().__init__(message, violations=vs)


class NotFound(ConvLensError):
    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message, violations=[FieldViolation(field, message)] if field else None)


class PermissionDenied(ConvLensError):
    pass


class FailedPrecondition(ConvLensError):
    pass


class ResourceExhausted(ConvLensError):
    pass


class DeadlineExceeded(ConvLensError):
    pass


class Cancelled(ConvLensError):
    pass


class Unavailable(ConvLensError):
    pass


class Unimplemented(ConvLensError):
    pass
