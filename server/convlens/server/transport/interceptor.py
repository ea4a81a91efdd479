"""One server interceptor around every RPC: request id, drain, bearer token, metrics, access log, and
domain errors turned into statuses.

Per call it does as little as it can: the wrapped handler, its labelled metric children and its flags are
built once per method and cached (handlers never change after start), so a call pays for a dict lookup,
two counter increments, one histogram observation and — for non-health calls — one log line.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc.aio import AbortError, ServerInterceptor

from convlens.server.errors import Unavailable
from convlens.server.metrics import Metrics
from convlens.server.transport.access_log import AUDIT_PREFIX, HEALTH_PREFIX, AccessLog
from convlens.server.transport.auth import TokenAuth, Unauthenticated, require_admin
from convlens.server.transport.drain import Drain, InFlight
from convlens.server.transport.status import to_status

REQUEST_ID = "x-request-id"
_OK = grpc.StatusCode.OK
# Made-up request ids: a random per-process prefix and a counter (uuid4 costs a getrandom call per RPC).
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count(1)


def _request_id(metadata: Any) -> str:
    """The caller's x-request-id when it is sane (printable, at most 128 characters), else a new one."""
    for key, value in metadata or ():
        if key == REQUEST_ID:
            if isinstance(value, str) and 0 < len(value) <= 128 and value.isprintable():
                return value
            break
    return f"{_ID_PREFIX}{next(_ID_COUNTER):08x}"


def _model(request: Any) -> str:
    try:
        return str(request.model)
    except AttributeError:
        return ""


class _Method:
    """What the interceptor needs per method, computed once."""

    def __init__(self, full: str, kind: str, metrics: Metrics, auth: TokenAuth | None, protocol: str) -> None:
        service, _, method = full.lstrip("/").rpartition("/")
        self.full = full
        self.health = full.startswith(HEALTH_PREFIX)
        self.stream = kind == "server_stream"
        self.needs_token = auth is not None and not auth.is_exempt(full)
        self.needs_admin = auth is not None and auth.needs_admin(full)
        self.audited = full.startswith(AUDIT_PREFIX)
        self.protocol = protocol
        self.started = metrics.started.labels(kind, service, method, protocol)
        self.seconds = metrics.handling_seconds.labels(kind, service, method, protocol)
        self._handled = metrics.handled
        self._labels = (kind, service, method)
        self._by_code: dict[grpc.StatusCode, Any] = {}

    def handled(self, code: grpc.StatusCode) -> Any:
        child = self._by_code.get(code)
        if child is None:
            child = self._by_code[code] = self._handled.labels(*self._labels, code.name, self.protocol)
        return child


class _Outcome:
    """A call's result as the log and metrics see it."""

    __slots__ = ("code", "error", "caller", "request_id", "model", "target")

    def __init__(self) -> None:
        self.code = _OK
        self.error = ""
        self.caller = ""
        self.request_id = ""
        self.model = ""
        self.target = ""


def _target(request: Any) -> str:
    """What a model-control call is about, for its audit line: MODEL or MODEL@VERSION."""
    model = _model(request)
    try:
        return f"{model}@{request.version}" if request.HasField("version") else model
    except ValueError:  # a request without a version field
        return model


class ServiceInterceptor(ServerInterceptor):
    """`protocol` labels the metrics and the access log: "grpc" here, "http" for the HTTP front, which wraps
    the same servicer handlers with its own instance (sharing metrics, tokens, log and drain)."""

    def __init__(self, metrics: Metrics, *, auth: TokenAuth | None = None, access_log: AccessLog | None = None,
                 drain: Drain | None = None, protocol: str = "grpc") -> None:
        self.protocol = protocol
        self.metrics = metrics
        self.auth = auth
        self.access_log = access_log or AccessLog()
        self.drain = drain or Drain()
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        wrapped = self._handlers.get(details.method)
        if wrapped is None:
            wrapped = self._wrap(await continuation(details), details.method)
            if wrapped is not None:  # unknown names are not kept: callers choose them
                self._handlers[details.method] = wrapped
        return wrapped  # type: ignore[return-value]

    def wrap(self, handler: grpc.RpcMethodHandler | None, full: str) -> grpc.RpcMethodHandler | None:
        """`handler` with everything above around it (also how the HTTP front calls the servicers)."""
        return self._wrap(handler, full)

    def _wrap(self, handler: grpc.RpcMethodHandler | None, full: str) -> grpc.RpcMethodHandler | None:
        if handler is None:
            return None  # unknown method: grpc answers UNIMPLEMENTED
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, _Method(full, "unary", self.metrics, self.auth, self.protocol)),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(handler.unary_stream,
                             _Method(full, "server_stream", self.metrics, self.auth, self.protocol)),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                self._bidi(handler.stream_stream, _Method(full, "bidi_stream", self.metrics, self.auth, self.protocol)),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler  # client-streaming: none served

    # ------------------------------------------------------------------ before and after the body

    def _admit(self, m: _Method, request: Any, context: grpc.aio.ServicerContext,
               out: _Outcome) -> InFlight | None:
        """Request id, drain and token checks; raises what the caller should see. Health calls are not
        tracked for the drain: a Watch stream lasts as long as its caller, and probes must keep working."""
        metadata = context.invocation_metadata()
        out.request_id = _request_id(metadata)
        context.set_trailing_metadata(((REQUEST_ID, out.request_id),))
        out.model = _model(request)
        if m.audited:
            out.target = _target(request)
        if self.drain.draining and not m.health:
            self.drain.refused()
            raise Unavailable("server is shutting down (draining); retry on another replica")
        if m.needs_token:
            assert self.auth is not None
            out.caller, admin = self.auth.identify(metadata)
            if m.needs_admin:
                require_admin(out.caller, admin)
        if m.health:
            if m.stream:
                self.drain.watch()
            return None
        return self.drain.enter()

    async def _fail(self, exc: BaseException, call: InFlight | None, context: grpc.aio.ServicerContext,
                    out: _Outcome) -> None:
        """Answer `exc` as a status (always raises AbortError), recording the code for log and metrics."""
        if isinstance(exc, Unauthenticated):
            out.code, out.error = grpc.StatusCode.UNAUTHENTICATED, str(exc)
            await context.abort(out.code, out.error)
        if isinstance(exc, asyncio.CancelledError):  # only cut calls get here
            assert call is not None
            exc = Unavailable(f"server shut down before this call finished: the drain grace of "
                              f"{self.drain.grace_seconds:g} s ran out {call.progress_text()}; retry")
        status = to_status(exc)
        out.code, out.error = status.code, status.details
        # abort replaces the trailing metadata set before: the request id goes along with the details
        await context.abort(status.code, status.details,
                            (*status.trailing_metadata, (REQUEST_ID, out.request_id)))

    async def _failed(self, exc: BaseException, call: InFlight | None, context: grpc.aio.ServicerContext,
                      out: _Outcome) -> None:
        """How every call shape ends on an exception (always raises): an abort already sent goes on as it is;
        a cancellation that is not the drain cutting the call is the caller leaving; the rest (including a cut
        call's cancellation) is answered as a status by _fail."""
        if isinstance(exc, AbortError):
            out.code = context.code() or grpc.StatusCode.UNKNOWN
            raise exc
        if isinstance(exc, asyncio.CancelledError) and (call is None or not call.cut):
            out.code = grpc.StatusCode.CANCELLED
            raise exc
        await self._fail(exc, call, context, out)

    def _done(self, m: _Method, started: float, peer: str, out: _Outcome, call: InFlight | None) -> None:
        if call is not None:
            self.drain.leave(call)
        seconds = time.perf_counter() - started
        m.handled(out.code).inc()
        m.seconds.observe(seconds)
        if self.access_log.enabled_for(m.full):
            self.access_log.record(method=m.full, code=out.code.name, ms=seconds * 1e3, model=out.model,
                                   peer=peer, request_id=out.request_id, caller=out.caller, error=out.error,
                                   responses=call.responses if m.stream and call is not None else None,
                                   protocol=m.protocol)
        if m.audited:
            self.access_log.audit(method=m.full, caller=out.caller, target=out.target, code=out.code.name,
                                  peer=peer, request_id=out.request_id, error=out.error)

    # ------------------------------------------------------------------ the call shapes

    def _unary(self, behavior: Callable[..., Any], m: _Method) -> Callable[..., Any]:
        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
            m.started.inc()
            started = time.perf_counter()
            out = _Outcome()
            call = None
            try:
                call = self._admit(m, request, context, out)
                if call is None:
                    return await behavior(request, context)
                call.in_body = True
                try:
                    return await behavior(request, context)
                finally:
                    call.in_body = False
            except (asyncio.CancelledError, Exception) as exc:  # every failure is reported as a status
                await self._failed(exc, call, context, out)
            finally:
                self._done(m, started, context.peer(), out, call)
        return wrapper

    def _stream(self, behavior: Callable[..., Any], m: _Method) -> Callable[..., Any]:
        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            m.started.inc()
            started = time.perf_counter()
            out = _Outcome()
            call = None
            responses: Any = None
            finished = False
            peer = context.peer()  # now: after the call ended, context.peer() can segfault (grpc 1.7x, seen here)
            try:
                call = self._admit(m, request, context, out)
                responses = behavior(request, context)
                if not hasattr(responses, "__aiter__"):  # a handler that writes with context.write()
                    await responses  # (health Watch)
                    finished = True
                    return
                iterator = responses.__aiter__()
                while True:
                    # A drain cancels the task only while it is in here (computing the next response);
                    # while grpc is sending one, a cancel would hit grpc's own write and lose the status.
                    if call is not None:
                        call.in_body = True
                    try:
                        response = await iterator.__anext__()
                    except StopAsyncIteration:
                        break
                    finally:
                        if call is not None:
                            call.in_body = False
                    if call is not None:
                        call.responses += 1
                        _note_progress(call, response)
                    yield response
                    if call is not None and call.cut:  # cut while the response was on its way out
                        raise asyncio.CancelledError
                finished = True
            except (asyncio.CancelledError, Exception) as exc:
                if isinstance(exc, asyncio.CancelledError) and m.health and self.drain.draining:
                    out.code = grpc.StatusCode.UNAVAILABLE  # a Watch ended by the drain: say so, end the RPC
                    await context.abort(out.code, "server shut down")
                await self._failed(exc, call, context, out)
            finally:
                if not finished and out.code == _OK:  # closed at a yield: the caller went away
                    out.code = grpc.StatusCode.CANCELLED
                if responses is not None and hasattr(responses, "aclose"):
                    await responses.aclose()  # release the job now, not when the generator is collected
                self._done(m, started, peer, out, call)
        return wrapper

    def _bidi(self, behavior: Callable[..., Any], m: _Method) -> Callable[..., Any]:
        """Reflection: token, metrics and log only (its requests carry no model)."""
        async def wrapper(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            m.started.inc()
            started = time.perf_counter()
            out = _Outcome()
            call = None
            try:
                call = self._admit(m, None, context, out)
                if call is not None:
                    call.in_body = True  # short calls: a drain may cancel them anywhere
                async for response in behavior(requests, context):
                    yield response
            except (asyncio.CancelledError, Exception) as exc:  # every failure is reported as a status
                await self._failed(exc, call, context, out)
            finally:
                self._done(m, started, context.peer(), out, call)
        return wrapper


def _note_progress(call: InFlight, response: Any) -> None:
    """Streaming responses of this service carry `progress` events (step, total_steps) before the result."""
    try:
        if response.WhichOneof("event") != "progress":
            return
    except (AttributeError, ValueError):
        return
    call.step, call.total_steps = response.progress.step, response.progress.total_steps
