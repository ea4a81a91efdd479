"""The one place that answers UNIMPLEMENTED: every contract RPC a servicer class does not define.

Landing an RPC means defining its handler on the servicer; nothing here changes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

from convlens.server.errors import Unimplemented

T = TypeVar("T", bound=type)


def answer_unimplemented(service: ServiceDescriptor) -> Callable[[T], T]:
    """Class decorator: give `cls` a handler raising Unimplemented for each RPC of `service` it lacks."""

    def decorate(cls: T) -> T:
        methods = list(service.methods)
        available = [m.name for m in methods if m.name in cls.__dict__]
        for method in methods:
            if method.name not in cls.__dict__:
                setattr(cls, method.name, _handler(method, available))
        return cls

    return decorate


def _handler(method: MethodDescriptor, available: list[str]) -> Callable[..., Any]:
    message = (f"{method.name} is part of the {method.containing_service.full_name} contract but not "
               f"implemented by this server yet; available now: {', '.join(available)}")
    if method.server_streaming:
        async def stream(self: Any, request: Any, context: Any) -> AsyncIterator[Any]:
            raise Unimplemented(message)
            yield  # a generator: a server-streaming handler
        return stream

    async def unary(self: Any, request: Any, context: Any) -> Any:
        raise Unimplemented(message)
    return unary
