"""KServe's v1 data plane for an explainer: readiness and `:explain`, answered by Saliency.

- `GET /v1/models/NAME`: `{"name": NAME, "ready": true}` (200) while the server serves; 503 with
  `"ready": false` while it drains; 404 for a name it does not serve. `GET /v1/models` lists the names.
- `POST /v1/models/NAME:explain` with `{"instances": [...], "parameters": {...}}` (`inputs` is read like
  `instances`). An instance is an image: `{"b64": "<base64 PNG/JPEG>"}` (also under one key, as in
  `{"image_bytes": {"b64": ...}}`), a bare base64 string, or nested lists `[H][W][C]` (integers 0..255, or
  floats on 0..255). `parameters` holds the SaliencyRequest fields in proto3 JSON, with two short forms:
  `"method": "grad_cam"` for `SALIENCY_METHOD_GRAD_CAM`, and `"target": 281` for a class index
  (`{"layer": ..., "channel": ...}` for a unit). Every instance is one Saliency call through the same path
  as a gRPC one (tokens, batching with other callers, metrics, access log); they run concurrently, so they
  share batches.
- The answer: `{"explanations": [...]}`, one per instance, each the SaliencyResponse in proto3 JSON except
  that every field is present (defaults too), its tensors (`attribution`, `heatmap`) are `{"dtype":
  "float32", "shape": [...], "values": nested lists}` and its PNG bytes (`overlayPng`) are `{"b64": ...}`
  (null when not asked for): plain JSON numbers a caller can use without protobuf. Errors: the Connect
  error body plus KServe's `"error"` message; its field violations name the body's paths (`instances[1]`,
  `parameters.smoothgrad.samples`), for a bad JSON value and a bad value alike.
- Tokens (`--auth-tokens`): `GET /v1/models` and `:explain` check the token first (401 before any 404 or
  400); readiness needs none (see KServeRoutes).

NAME is a served model, or an alias given at start (`convlens kserve-explainer --model_name`, which KServe
sets to the InferenceService's name).
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable, Mapping
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.rpc import error_details_pb2, status_pb2
from grpc.aio import AbortError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from convlens.server.errors import InvalidArgument, NotFound
from convlens.server.transport.auth import Unauthenticated
from convlens.server.transport.http.context import HttpContext
from convlens.server.transport.http.errors import HTTP_STATUS, STATUS_DETAILS_KEY, error_body, headers_from
from convlens.server.transport.http.registry import Method
from convlens.server.transport.http.rpc import (
    Guard,
    call_unary,
    context_for,
    decode_body,
    failing_handler,
    parse_message,
    to_json,
)
from convlens.server.transport.interceptor import ServiceInterceptor
from convlens.server.transport.status import to_status
from convlens.v1 import convlens_pb2 as pb
from convlens.wire.tensors import to_numpy, to_tensor

SALIENCY_PATH = "/convlens.v1.InspectionService/Saliency"
_TENSOR = pb.Tensor.DESCRIPTOR.full_name


def kserve_error(code: grpc.StatusCode, message: str, trailing: Any = ()) -> JSONResponse:
    body = {"error": message, **error_body(code, message, trailing)}
    return JSONResponse(body, status_code=HTTP_STATUS.get(code, 500), headers=headers_from(trailing))


def _status_error(exc: Exception) -> JSONResponse:
    status = to_status(exc)
    return kserve_error(status.code, status.details, status.trailing_metadata)


def kserve_field(field: str, key: str, index: int) -> str:
    """A Saliency field violation as the path in the KServe body: the image is `instances[i]`, the model is
    the URL's, every other field came from `parameters` (as the JSON errors of `parameters` say)."""
    if field == "image" or field.startswith("image."):
        return f"{key}[{index}]{field[len('image'):]}"
    if field in ("model", "…", "") or field.startswith(("parameters.", f"{key}[")):
        return field
    return f"parameters.{field}"


def kserve_trailing(trailing: Any, key: str, index: int) -> list[tuple[str, Any]]:
    """`trailing` with the BadRequest's fields renamed by kserve_field (the other details as they were)."""
    out = []
    for name, value in trailing or ():
        if name == STATUS_DETAILS_KEY:
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                bad = error_details_pb2.BadRequest()
                if detail.Unpack(bad):
                    for violation in bad.field_violations:
                        violation.field = kserve_field(violation.field, key, index)
                    detail.Pack(bad)
            value = status.SerializeToString()
        out.append((name, value))
    return out


# ---------------------------------------------------------------- request -> SaliencyRequest

def image_json(instance: object, field: str) -> dict[str, Any]:
    """One instance as the proto3 JSON of an `Image`."""
    if isinstance(instance, dict) and len(instance) == 1:
        (key, value), = instance.items()
        if key != "b64" and isinstance(value, dict) and set(value) == {"b64"}:
            instance, field = value, f"{field}.{key}"
    if isinstance(instance, dict) and set(instance) == {"b64"}:
        instance = instance["b64"]
        field = f"{field}.b64"
    if isinstance(instance, str):
        try:
            base64.b64decode(instance, validate=True)
        except ValueError:
            raise InvalidArgument("not base64 (an encoded PNG or JPEG is expected)", field=field) from None
        return {"encoded": instance}
    if isinstance(instance, list):
        try:
            array = np.asarray(instance)
        except ValueError:
            raise InvalidArgument("nested lists of unequal lengths (expected [H][W][C])", field=field) from None
        if array.dtype.kind in "iub" and array.size and (array.min() < 0 or array.max() > 255):
            raise InvalidArgument("integer pixels must be in 0..255", field=field)
        if array.dtype.kind in "iub":
            array = array.astype(np.uint8)
        elif array.dtype.kind == "f":
            array = array.astype(np.float32)
        else:
            raise InvalidArgument(f"pixels must be numbers, got {array.dtype.kind!r} values", field=field)
        return {"tensor": to_json(to_tensor(array))}
    raise InvalidArgument('an instance is {"b64": "<base64 PNG/JPEG>"}, a base64 string, or nested lists '
                          "[H][W][C] of pixels", field=field)


def request_json(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """`parameters` with the short forms expanded (see the module doc)."""
    out = dict(parameters)
    method = out.get("method")
    if isinstance(method, str) and not method.startswith("SALIENCY_METHOD_"):
        out["method"] = "SALIENCY_METHOD_" + method.upper()
    target = out.get("target")
    if isinstance(target, int) and not isinstance(target, bool):
        out["target"] = {"classIndex": target}
    elif isinstance(target, dict) and "layer" in target:
        out["target"] = {"unit": target}
    return out


def instances_key(body: object) -> str:
    """Where the body holds its images: KServe v1's `instances`, or `inputs`."""
    return "inputs" if isinstance(body, dict) and "inputs" in body and "instances" not in body else "instances"


def saliency_requests(body: object, model: str) -> list[Any]:
    if not isinstance(body, dict):
        raise InvalidArgument('expected {"instances": [...], "parameters": {...}}', field="(body)")
    key = instances_key(body)
    instances = body.get(key)
    if not isinstance(instances, list) or not instances:
        raise InvalidArgument("a non-empty list of images is expected", field=key)
    parameters = body.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidArgument("parameters must be a JSON object of SaliencyRequest fields", field="parameters")
    for name in ("model", "image"):
        if name in parameters:
            raise InvalidArgument(f"{name} comes from the URL and the instances, not from parameters",
                                  field=f"parameters.{name}")
    base = parse_message(request_json(parameters), pb.SaliencyRequest, prefix="parameters.")
    requests = []
    for i, instance in enumerate(instances):
        request = pb.SaliencyRequest()
        request.CopyFrom(base)
        request.model = model
        request.image.CopyFrom(parse_message(image_json(instance, f"{key}[{i}]"), pb.Image, f"{key}[{i}]."))
        requests.append(request)
    return requests


# ---------------------------------------------------------------- SaliencyResponse -> explanation

def explanation(response: Any) -> dict[str, Any]:
    """proto3 JSON with every field present (a class index 0 is written, not left out), tensors as nested
    lists and PNG bytes as {"b64": ...}."""
    out = json_format.MessageToDict(response, always_print_fields_with_no_presence=True)
    for field in response.DESCRIPTOR.fields:
        if field.message_type is not None and field.message_type.full_name == _TENSOR:
            if response.HasField(field.name):
                array = to_numpy(getattr(response, field.name))
                out[field.json_name] = {"dtype": str(array.dtype), "shape": list(array.shape),
                                        "values": array.tolist()}
        elif field.type == FieldDescriptor.TYPE_BYTES and field.name.endswith("_png"):
            value = getattr(response, field.name)
            out[field.json_name] = {"b64": base64.b64encode(value).decode()} if value else None
    return out


# ---------------------------------------------------------------- routes

class KServeRoutes:
    """With tokens on, `GET /v1/models` and `:explain` check the caller's token before anything else (an
    unknown name and a bad body answer 401 to a caller without one, so names do not leak); readiness needs
    none (Kubernetes probes send none, as for gRPC health), and without a known token it answers the server's
    readiness for any name: only a caller with a token learns whether a name is served (404)."""

    def __init__(self, saliency: Method, interceptor: ServiceInterceptor, models: Callable[[], list[str]],
                 ready: Callable[[], bool], aliases: Mapping[str, str]) -> None:
        self.interceptor = interceptor
        self.saliency = interceptor.wrap(saliency.handler, saliency.path)
        self.models = models
        self.ready = ready
        self.aliases = dict(aliases)

    def routes(self) -> list[Route]:
        return [Route("/", self.live, methods=["GET"]),
                Route("/v1/models", self.list_models, methods=["GET"]),
                Route("/v1/models/{target}", self.model, methods=["GET", "POST"])]

    def resolve(self, name: str) -> str:
        model = self.aliases.get(name, name)
        served = self.models()
        if model not in served:
            raise NotFound(f"model {name!r} is not served here; served: {', '.join(sorted(self.names()))}",
                           field="model", reason="MODEL_NOT_FOUND")
        return model

    def names(self) -> list[str]:
        return sorted({*self.aliases, *self.models()})

    def caller(self, request: Request) -> Unauthenticated | None:
        """Why the request's token is refused (None: tokens are off, or it is a known token)."""
        auth = self.interceptor.auth
        if auth is None or auth.is_exempt(SALIENCY_PATH):
            return None
        try:
            auth.identify(request.headers.items())
        except Unauthenticated as exc:
            return exc
        return None

    async def live(self, request: Request) -> Response:
        return JSONResponse({"status": "alive"})

    async def list_models(self, request: Request) -> Response:
        refused = self.caller(request)
        if refused is not None:
            return kserve_error(grpc.StatusCode.UNAUTHENTICATED, str(refused))
        return JSONResponse({"models": self.names()})

    async def model(self, request: Request) -> Response:
        target = request.path_params["target"]
        name, _, verb = target.partition(":")
        if request.method == "GET":
            if verb:
                return kserve_error(grpc.StatusCode.NOT_FOUND, f"no GET route for {verb!r}; GET /v1/models/{name}")
            if self.caller(request) is None:
                try:
                    self.resolve(name)
                except NotFound as exc:
                    return _status_error(exc)
            ready = self.ready()
            return JSONResponse({"name": name, "ready": ready}, status_code=200 if ready else 503)
        if verb != "explain":
            return kserve_error(grpc.StatusCode.UNIMPLEMENTED,
                                f"ConvLens is an explainer: it answers POST /v1/models/{name}:explain"
                                + (f", not :{verb} (ask the predictor)" if verb else ""))
        return await self.explain(request, name)

    async def refuse(self, exc: Exception, ctx: HttpContext) -> Response:
        """`exc` answered through the wrapped Saliency path: the token first, then `exc`; logged and counted."""
        handler = failing_handler(self.interceptor, SALIENCY_PATH, exc)
        try:
            await handler.unary_unary(pb.SaliencyRequest(), ctx)
        except AbortError:
            return kserve_error(ctx.code() or grpc.StatusCode.UNKNOWN, ctx.details(), ctx.trailing)
        raise AssertionError("a failing handler answered")  # pragma: no cover

    async def explain(self, request: Request, name: str) -> Response:
        try:
            ctx0 = context_for(request)
        except InvalidArgument as exc:
            return _status_error(exc)
        try:
            model = self.resolve(name)
            body = decode_body(await request.body())
            key = instances_key(body)
            requests = saliency_requests(body, model)
        except (InvalidArgument, NotFound) as exc:
            return await self.refuse(exc, ctx0)
        timeout = ctx0.time_remaining()
        contexts = [HttpContext(ctx0.invocation_metadata(), ctx0.peer(), timeout) for _ in requests]
        guard = Guard(request.receive, timeout)
        with guard:
            try:
                answers = await asyncio.gather(*(call_unary(self.saliency.unary_unary, r, c, guard)
                                                 for r, c in zip(requests, contexts, strict=True)),
                                               return_exceptions=True)
            except asyncio.CancelledError:
                if not guard.caller_left():
                    raise
                return Response(status_code=499)
        for i, (answer, ctx) in enumerate(zip(answers, contexts, strict=True)):
            if isinstance(answer, AbortError):
                return kserve_error(ctx.code() or grpc.StatusCode.UNKNOWN, f"{key}[{i}]: {ctx.details()}",
                                    kserve_trailing(ctx.trailing, key, i))
            if isinstance(answer, TimeoutError):
                return kserve_error(grpc.StatusCode.DEADLINE_EXCEEDED, f"{key}[{i}]: deadline exceeded")
            if isinstance(answer, BaseException):
                raise answer
        return JSONResponse({"explanations": [explanation(a) for a in answers]},
                            headers=headers_from(contexts[0].trailing))
