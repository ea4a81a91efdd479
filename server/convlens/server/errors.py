"""Domain errors of the server side. No grpc here: transport/status.py maps them to status codes.

Each error carries a stable `reason` (UPPER_SNAKE_CASE, sent as google.rpc.ErrorInfo.reason beside the status
code): the class's default, or a more precise one where it is raised (MODEL_NOT_FOUND, QUEUE_FULL, ...).
`Violations` gathers every bad field of a request so one answer names them all.

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

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


def _field_first(field: str | None, message: str, violations: list[FieldViolation] | None) -> list[FieldViolation]:
    """`violations`, led by one for `field` (described by `message`) when a field is named."""
    return ([FieldViolation(field, message)] if field is not None else []) + list(violations or [])


class ConvLensError(Exception):
    """Base of every error the server reports to a caller on purpose."""

    reason = "ERROR"  # each subclass names its own default

    def __init__(self, message: str, *, violations: list[FieldViolation] | None = None,
                 reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.violations = list(violations or [])
        if reason is not None:
            self.reason = reason


class InvalidArgument(ConvLensError):
    """A request field is wrong. `field` names it (proto field path, e.g. "target.unit.layer")."""

    reason = "INVALID_ARGUMENT"

    def __init__(self, message: str, *, field: str | None = None,
                 violations: list[FieldViolation] | None = None, reason: str | None = None) -> None:
        super().__init__(message, violations=_field_first(field, message, violations), reason=reason)


class NotFound(ConvLensError):
    """An unknown name: the reason says which kind (MODEL_NOT_FOUND, LAYER_NOT_FOUND, DATASET_NOT_FOUND)."""

    reason = "NOT_FOUND"

    def __init__(self, message: str, *, field: str | None = None, violations: list[FieldViolation] | None = None,
                 reason: str | None = None) -> None:
        super().__init__(message, violations=_field_first(field, message, violations), reason=reason)


class PermissionDenied(ConvLensError):
    reason = "PERMISSION_DENIED"


class FailedPrecondition(ConvLensError):
    reason = "FAILED_PRECONDITION"


class ResourceExhausted(ConvLensError):
    reason = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(ConvLensError):
    reason = "DEADLINE_EXCEEDED"


class Cancelled(ConvLensError):
    reason = "CANCELLED"


class Unavailable(ConvLensError):
    reason = "UNAVAILABLE"


class Unimplemented(ConvLensError):
    reason = "UNIMPLEMENTED"


class Violations:
    """Every bad field of one request, gathered so the caller hears of all of them at once.

        v = Violations()
        v.check(1 <= steps <= 2000, "steps", f"steps = {steps} is out of range (1..2000)")
        v.add("size", "...")
        v.raise_if_any()   # InvalidArgument: the first message (+ "and N more"), every field in violations

    `collect(fn)` runs a check that raises InvalidArgument or NotFound and records its violations instead. A
    NotFound decides the status (an unknown layer is NOT_FOUND, as when it is raised alone): `raise_if_any`
    then raises NotFound, with its message and reason, carrying every violation gathered.
    """

    def __init__(self) -> None:
        self.items: list[FieldViolation] = []
        self._messages: list[str] = []
        self._not_found: NotFound | None = None

    def add(self, field: str, description: str) -> None:
        self.items.append(FieldViolation(field, description))
        self._messages.append(description)

    def check(self, ok: bool, field: str, description: str) -> bool:
        if not ok:
            self.add(field, description)
        return ok

    def collect(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """fn(*args, **kwargs); an InvalidArgument or NotFound it raises is recorded (None returned) instead
        of raised."""
        try:
            return fn(*args, **kwargs)
        except (InvalidArgument, NotFound) as exc:
            if isinstance(exc, NotFound) and self._not_found is None:
                self._not_found = exc
            self.items.extend(exc.violations or [FieldViolation("", exc.message)])
            self._messages.append(exc.message)
            return None

    def __bool__(self) -> bool:
        return bool(self.items)

    def raise_if_any(self) -> None:
        if not self.items:
            return
        first = self._not_found
        message = self._messages[0] if first is None else first.message
        if len(self.items) > 1:
            message += f" (and {len(self.items) - 1} more: see the field violations)"
        if first is not None:
            raise NotFound(message, violations=self.items, reason=first.reason)
        raise InvalidArgument(message, violations=self.items)


# ---- bounded echo: what a caller sent comes back in messages, never whole (issue #15) ----------------------

ECHO_LIMIT = 80  # characters of a caller's value quoted in a message


def echo(value: object, limit: int = ECHO_LIMIT) -> str:
    """`repr(value)`, cut to `limit` characters with the original length said: a 100,000-character model name
    must not become 300 kB of trailers that a default client refuses to read."""
    text = repr(value)
    if len(text) <= limit:
        return text
    length = f" ({len(value)} chars)" if isinstance(value, str | bytes) else ""
    return f"{text[:limit]}…{length}"
