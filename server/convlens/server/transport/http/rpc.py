"""The contract's RPCs over HTTP, generated from the services' descriptors (the Connect / Twirp convention).

`POST /<package>.<Service>/<Method>` with the request message as proto3 JSON answers the response message as
proto3 JSON (unary), or as server-sent events (server streaming): one `event: <oneof field>` per message —
`progress` ..., then `result` — and a last `end` event, or an `error` event carrying the error body. Errors
before the first message answer a JSON error with the HTTP status of the code (errors.py).

Each call runs the handler the gRPC server registered, wrapped by the HTTP front's interceptor, so tokens,
the drain, metrics and the access log apply as over gRPC. The request's task is the call's task: the drain
cuts it like a gRPC call's, a caller who hangs up cancels it (as a gRPC cancellation does), and the deadline
from `connect-timeout-ms` / `grpc-timeout` ends it.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor
from grpc.aio import AbortError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from convlens.server.errors import InvalidArgument
from convlens.server.transport.http.context import HttpContext, peer, timeout_seconds
from convlens.server.transport.http.errors import HTTP_STATUS, error_body, headers_from
from convlens.server.transport.http.registry import Method
from convlens.server.transport.interceptor import ServiceInterceptor
from convlens.server.transport.status import to_status

BODY_FIELD = "(body)"
INVALID_JSON = "INVALID_JSON"  # the ErrorInfo reason of a body that is not the request message's proto3 JSON


def to_json(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message)


def error_response(code: grpc.StatusCode, message: str, trailing: Any = ()) -> JSONResponse:
    body = error_body(code, message, trailing)
    return JSONResponse(body, status_code=HTTP_STATUS.get(code, 500), headers=headers_from(trailing))


def status_response(exc: Exception) -> JSONResponse:
    status = to_status(exc)
    return error_response(status.code, status.details, status.trailing_metadata)


def field_path(error: str, data: object, descriptor: Descriptor | None) -> str:
    """The request field a json_format.ParseError names, as a proto field path (`target.unit.channel`).

    The error names the fields it failed in, outermost first, but may skip one (a oneof's message: "target",
    then "channel" for `target.unit.channel`); the path is the one in the JSON itself that passes through
    those names in order, spelled with the proto field names.
    """
    names = re.findall(r"Failed to parse (\S+) field", error)
    unknown = re.search(r'has no field named "([^"]+)"', error)
    if unknown:
        names.append(unknown.group(1))
    else:
        # A proto3 `optional` field's error names its whole path only at the end, after the message's name:
        # "... at SaliencyRequest.smoothgrad.samples."
        at = re.search(r" at [A-Za-z_]\w*((?:\.\w+)+?)\.*$", error)
        if at and len(at.group(1).split(".")[1:]) >= len(names):
            names = at.group(1).split(".")[1:]
    keys = _json_path(data, names) if names else None
    if keys is None:
        return ".".join(names) or BODY_FIELD
    path: list[str] = []
    for key in keys:
        field = None
        if descriptor is not None and not key.isdigit():
            field = descriptor.fields_by_camelcase_name.get(key) or descriptor.fields_by_name.get(key)
        if key.isdigit():  # an element of a repeated field: `images[1]`
            path[-1] += f"[{key}]"
            continue
        path.append(field.name if field is not None else key)
        descriptor = field.message_type if field is not None else None
    return ".".join(path)


def _json_path(data: object, names: list[str]) -> list[str] | None:
    """Keys (list indices as digits) from the top of `data` to the last of `names`, through all of them."""
    if not names:
        return []
    items: list[tuple[str, object]] = []
    if isinstance(data, dict):
        items = [(str(k), v) for k, v in data.items()]
    elif isinstance(data, list):
        items = [(str(i), v) for i, v in enumerate(data)]
    for key, value in items:
        rest = names[1:] if key == names[0] else names
        if not rest and key == names[0]:
            return [key]
        if isinstance(value, (dict, list)):
            found = _json_path(value, rest)
            if found is not None:
                return [key, *found]
    return None


def parse_message(data: object, message_class: Any, prefix: str = "") -> Any:
    """proto3 JSON (already decoded) into `message_class`; InvalidArgument naming the field otherwise."""
    if not isinstance(data, dict):
        raise InvalidArgument(f"expected a JSON object (the {message_class.DESCRIPTOR.full_name} message in "
                              f"proto3 JSON), got {type(data).__name__}", field=prefix.rstrip(".") or BODY_FIELD,
                              reason=INVALID_JSON)
    try:
        return json_format.ParseDict(data, message_class())
    except json_format.ParseError as exc:
        text = str(exc).split("\n")[0]
        raise InvalidArgument(f"bad {message_class.DESCRIPTOR.name} JSON: {text}",
                              field=prefix + field_path(text, data, message_class.DESCRIPTOR),
                              reason=INVALID_JSON) from None


def decode_body(body: bytes) -> object:
    try:
        return json.loads(body) if body.strip() else {}
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise InvalidArgument(f"the body is not JSON: {exc}", field=BODY_FIELD, reason=INVALID_JSON) from None


def event_name(message: Any) -> str:
    """The set field of the response's oneof (`progress`, `result`), else `message`."""
    for oneof in message.DESCRIPTOR.oneofs:
        which = message.WhichOneof(oneof.name)
        if which:
            return str(which)
    return "message"


def sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class Guard:
    """Runs a call's awaits in the request's own task: ends them at the deadline, and when the caller hangs
    up (the next ASGI message is http.disconnect) cancels the task as grpc cancels a call whose caller left."""

    def __init__(self, receive: Receive, timeout: float | None) -> None:
        loop = asyncio.get_running_loop()
        self.when = None if timeout is None else loop.time() + timeout
        self.left = False
        self._receive = receive
        self._task = asyncio.current_task()
        self._watcher: asyncio.Task[None] | None = None

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self.left = True
        if self._task is not None:
            self._task.cancel()

    def __enter__(self) -> Guard:
        self._watcher = asyncio.create_task(self._watch())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._watcher is not None:
            self._watcher.cancel()

    def caller_left(self) -> bool:
        """After a CancelledError: True (and the cancellation consumed) when it was the caller hanging up."""
        if self.left and self._task is not None:
            self._task.uncancel()
            return True
        return False


async def call_unary(behavior: Callable[..., Awaitable[Any]], message: Any, ctx: HttpContext,
                     guard: Guard) -> Any:
    """The handler's answer; AbortError (the status is in `ctx`) or TimeoutError (deadline) otherwise."""
    async with asyncio.timeout_at(guard.when):
        return await behavior(message, ctx)


class EventStream(Response):
    """A server-sent event stream from an already started call: its first message, then the rest."""

    def __init__(self, first: Any, rest: AsyncIterator[Any], ctx: HttpContext, guard: Guard) -> None:
        super().__init__(status_code=200)
        self.first, self.rest, self.ctx, self.guard = first, rest, ctx, guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
                   *((k.encode(), v.encode()) for k, v in headers_from(self.ctx.trailing).items())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})

        async def event(data: bytes) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": True})

        with self.guard:
            try:
                async with asyncio.timeout_at(self.guard.when):
                    await event(sse(event_name(self.first), to_json(self.first)))
                    async for message in self.rest:
                        await event(sse(event_name(message), to_json(message)))
                await event(sse("end", {}))
            except AbortError:
                code = self.ctx.code() or grpc.StatusCode.UNKNOWN
                await event(sse("error", error_body(code, self.ctx.details(), self.ctx.trailing)))
            except TimeoutError:
                await event(sse("error", error_body(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")))
            except asyncio.CancelledError:
                if not self.guard.caller_left():
                    raise
                return
            finally:
                await self.rest.aclose()  # type: ignore[attr-defined]
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class RpcRoutes:
    """One route per contract method the gRPC server serves; `routes()` for the Starlette app."""

    def __init__(self, methods: list[Method], interceptor: ServiceInterceptor) -> None:
        self.interceptor = interceptor
        self.methods = methods
        self._wrapped = {m.path: interceptor.wrap(m.handler, m.path) for m in methods}

    def routes(self) -> list[Route]:
        return [Route(m.path, self._endpoint(m), methods=["POST"]) for m in self.methods]

    def _endpoint(self, m: Method) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                ctx = context_for(request)
            except InvalidArgument as exc:
                return status_response(exc)
            handler = self._wrapped[m.path]
            try:
                message = parse_message(decode_body(await request.body()), m.request_class)
            except InvalidArgument as exc:
                message, handler = m.request_class(), failing_handler(self.interceptor, m.path, exc, m.streaming)
            guard = Guard(request.receive, ctx.time_remaining())
            if m.streaming:
                return await start_stream(handler.unary_stream, message, ctx, guard)
            with guard:
                try:
                    answer = await call_unary(handler.unary_unary, message, ctx, guard)
                except AbortError:
                    return error_response(ctx.code() or grpc.StatusCode.UNKNOWN, ctx.details(), ctx.trailing)
                except TimeoutError:
                    return error_response(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded", ctx.trailing)
                except asyncio.CancelledError:
                    if not guard.caller_left():
                        raise
                    return Response(status_code=499)
            return JSONResponse(to_json(answer), headers=headers_from(ctx.trailing))
        return endpoint


def failing_handler(interceptor: ServiceInterceptor, path: str, exc: Exception,
                    streaming: bool = False) -> grpc.RpcMethodHandler:
    """A handler that raises `exc` (an unreadable request, an unknown KServe model), wrapped like the real one
    at `path`: the token is still checked first (a caller without one learns nothing about the request or
    the names served), and the call is logged and counted."""
    if streaming:
        async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
            raise exc
            yield
        handler = interceptor.wrap(grpc.unary_stream_rpc_method_handler(stream), path)
    else:
        async def unary(request: Any, context: Any) -> Any:
            raise exc
        handler = interceptor.wrap(grpc.unary_unary_rpc_method_handler(unary), path)
    assert handler is not None
    return handler


def context_for(request: Request) -> HttpContext:
    return HttpContext(request.headers.items(), peer(request.scope.get("client")), timeout_seconds(request.headers))


async def start_stream(behavior: Callable[..., Any], message: Any, ctx: HttpContext, guard: Guard) -> Response:
    """Run the stream to its first message here, so a call refused at once (bad field, no token, unknown
    model) answers a plain JSON error with its HTTP status; then the rest as events."""
    stream = behavior(message, ctx)
    with guard:
        try:
            async with asyncio.timeout_at(guard.when):
                first = await stream.__anext__()
        except StopAsyncIteration:
            return Response(sse("end", {}), media_type="text/event-stream", headers=headers_from(ctx.trailing))
        except AbortError:
            return error_response(ctx.code() or grpc.StatusCode.UNKNOWN, ctx.details(), ctx.trailing)
        except TimeoutError:
            await stream.aclose()
            return error_response(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded", ctx.trailing)
        except asyncio.CancelledError:
            if not guard.caller_left():
                raise
            await stream.aclose()
            return Response(status_code=499)
    return EventStream(first, stream, ctx, guard)
