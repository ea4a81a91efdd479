"""Client and AsyncClient: one method per RPC (snake case), Python values in, result dataclasses out.

Both build requests and decode responses through `_convert`, and route every gRPC error through
`_map_rpc_error`, so the two differ only in how they wait. Streaming RPCs come in two forms: a plain method
that returns the final result (calling `on_progress` for each step), and `stream_*`, which yields each
Progress and then the result as its last item; closing that generator early cancels the call on the server.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Iterator, Sequence
from typing import Any, TypeVar, Unpack

import grpc
import grpc.aio

from convlens.v1 import convlens_pb2 as pb
from convlens.v1 import convlens_pb2_grpc as pb_grpc

from . import _convert as cv
from ._config import ChannelConfig, TimeoutArg, TLSArg
from ._exceptions import ConvLensError, InternalError, _map_rpc_error
from ._types import (
    DatasetInfo,
    DreamOptions,
    DreamResult,
    Filters,
    ImageInput,
    MaximizeOptions,
    MaximizeResult,
    ModelDetails,
    ModelInfo,
    Progress,
    RepositoryModel,
    SaliencyResult,
    StyleTransferOptions,
    StyleTransferResult,
    Target,
    TopActivations,
)

R = TypeVar("R")
ProgressCallback = Callable[[Progress], Any]  # AsyncClient also awaits it when it returns an awaitable


def _pick(per_call: float | None, default: float | None) -> float | None:
    # A per-call timeout overrides the client's; None there means "the client's", not "forever".
    return per_call if per_call is not None else default


def _no_result(rpc: str) -> ConvLensError:
    # A stream that ends OK without its result breaks the contract; say so instead of returning None.
    return InternalError(f"{rpc} stream ended without a result", code=grpc.StatusCode.INTERNAL)


def _health_check(channel: Any, service: str) -> tuple[Any, Any]:
    """The Health.Check method on `channel` (blocking or asyncio alike) and its request."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    return health_pb2_grpc.HealthStub(channel).Check, health_pb2.HealthCheckRequest(service=service)


def _status_name(reply: Any) -> str:
    from grpc_health.v1 import health_pb2
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


class Client:
    """A blocking ConvLens client. Use as a context manager, or call close().

    target: "host:port", or any gRPC target; a comma list ("ipv4:10.0.0.1:50051,10.0.0.2:50051") or a
    "dns:///" name is balanced round-robin over its addresses.
    tls: False (plaintext), True (system roots), a path to root certificates, or a TLS object.
    token: sent as `authorization: Bearer <token>` on every call.
    timeout: seconds per unary call (streams get Timeout.stream), or a Timeout; None waits forever.
    options: extra gRPC channel options, applied last.
    """

    def __init__(self, target: str = "localhost:50051", *, tls: TLSArg = False, token: str | None = None,
                 timeout: TimeoutArg = 30.0, max_message_mb: int = 64,
                 options: Sequence[tuple[str, Any]] = ()) -> None:
        self._config = ChannelConfig.build(target, tls=tls, token=token, timeout=timeout,
                                           max_message_mb=max_message_mb, options=options)
        creds, opts = self._config.credentials(), self._config.channel_options()
        self._channel = (grpc.secure_channel(target, creds, opts) if creds is not None
                         else grpc.insecure_channel(target, opts))
        self._stub = pb_grpc.InspectionServiceStub(self._channel)
        self._repository = pb_grpc.ModelRepositoryServiceStub(self._channel)

    def __repr__(self) -> str:
        return f"Client({self._config.target!r})"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """The server's gRPC health status ("SERVING", "NOT_SERVING", ...), or `service`'s."""
        check, request = _health_check(self._channel, service)
        try:
            reply = check(request, metadata=self._config.metadata, timeout=_pick(timeout, self._config.timeout.unary))
        except grpc.RpcError as err:
            raise _map_rpc_error(err) from err
        return _status_name(reply)

    # ------------------------------------------------------------ plumbing

    def _unary(self, rpc: str, request: Any, timeout: float | None = None, stub: Any = None) -> Any:
        try:
            return getattr(stub or self._stub, rpc)(request, timeout=_pick(timeout, self._config.timeout.unary),
                                                    metadata=self._config.metadata)
        except grpc.RpcError as err:
            raise _map_rpc_error(err) from err

    def _stream(self, rpc: str, request: Any, decode: Callable[[Any], R],
                timeout: float | None) -> Generator[Progress | R, None, None]:
        call = getattr(self._stub, rpc)(request, timeout=_pick(timeout, self._config.timeout.stream),
                                        metadata=self._config.metadata)
        try:
            # The result is the last message: read on to the call's status before handing it over, so a
            # caller who stops at the result leaves the server a finished call, not a cancelled one.
            result = None
            for resp in call:
                event = cv.stream_event(resp, decode)
                if isinstance(event, Progress):
                    yield event
                elif event is not None:
                    result = event
            if result is not None:
                yield result
        except grpc.RpcError as err:
            raise _map_rpc_error(err) from err
        finally:
            call.cancel()  # no-op once finished; frees the server's job if the caller stopped early

    @staticmethod
    def _drain(rpc: str, events: Iterator[Progress | R], on_progress: ProgressCallback | None) -> R:
        try:
            for event in events:
                if not isinstance(event, Progress):
                    return event
                if on_progress is not None:
                    on_progress(event)
        finally:
            if isinstance(events, Generator):
                events.close()  # cancels the call now, not when the generator is collected
        raise _no_result(rpc)

    # ------------------------------------------------------------ unary RPCs

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        return [cv.model_info(m) for m in self._unary("ListModels", pb.ListModelsRequest(), timeout).models]

    def get_model(self, model: str, *, timeout: float | None = None) -> ModelDetails:
        return cv.model_details(self._unary("GetModel", pb.GetModelRequest(model=model), timeout))

    def get_filters(self, model: str, layer: str, *, grid: bool = False, scaling: str = "minmax",
                    max_filters: int | None = None, max_input_channels: int | None = None,
                    cell_scale: int | None = None, timeout: float | None = None) -> Filters:
        """A conv layer's weights [out, in/groups, kh, kw]; grid=True also has the server render them."""
        req = cv.filters_request(model, layer, grid=grid, scaling=scaling, max_filters=max_filters,
                                 max_input_channels=max_input_channels, cell_scale=cell_scale)
        return cv.filters(self._unary("GetFilters", req, timeout))

    def top_activations(self, model: str, layer: str, channel: int, *, k: int = 9,
                        dataset: str | None = "samples", ranking: str = "max", max_per_image: int = 1,
                        images: Sequence[ImageInput] | None = None, crops: bool = False,
                        include_images: bool = False, outputs: Sequence[str] | None = None,
                        timeout: float | None = None) -> TopActivations:
        """The k dataset regions (or regions of `images`) that most excite one channel, best first.

        A list of entries with .source .score .y .x .box .crop .image; `.stats` summarises the channel.
        outputs: which of entries, crops, images, photos, stats to compute and send (None: entries and stats,
        plus crops / images when asked by `crops` / `include_images`). "photos" (.photo) is the photo without
        the box, for drawing it yourself from .original_box or running the model on the photo as it is.
        """
        req = cv.top_activations_request(model, layer, channel, k=k, dataset=dataset, images=images,
                                         crops=crops, include_images=include_images, ranking=ranking,
                                         max_per_image=max_per_image, outputs=outputs)
        return cv.top_activations(self._unary("TopActivations", req, timeout))

    def list_datasets(self, *, timeout: float | None = None) -> list[DatasetInfo]:
        """The datasets TopActivations ranks on, with their image counts and indexes."""
        return cv.datasets(self._unary("ListDatasets", pb.ListDatasetsRequest(), timeout))

    def saliency(self, image: ImageInput, model: str, *, target: Target | None = None,
                 method: str = "gradient", samples: int | None = None, noise_level: float | None = None,
                 base_method: str | None = None, seed: int | None = None, steps: int | None = None,
                 baseline: str | ImageInput | None = None, blur_sigma: float | None = None,
                 cam_layer: str | None = None, overlay: bool = True, outputs: Sequence[str] | None = None,
                 timeout: float | None = None) -> SaliencyResult:
        """Attribute a class logit (int), a Unit, or (None) the top-1 class to the image's pixels.

        method: gradient, guided_backprop, deconvnet, smoothgrad, integrated_gradients, grad_cam,
        guided_grad_cam. SmoothGrad: samples, noise_level, base_method, seed. Integrated gradients: steps,
        baseline ("black", "blurred" or an image), blur_sigma. Grad-CAM: cam_layer. Unset: server default.
        outputs: which of attribution, heatmap, overlay, predictions to compute and send (None: all but
        the overlay, plus the overlay when `overlay`); outputs not asked come back as None / [].
        Every method also takes `timeout`: this call's deadline in seconds instead of the client's.
        """
        req = cv.saliency_request(image, model, target=target, method=method, samples=samples,
                                  noise_level=noise_level, base_method=base_method, seed=seed, steps=steps,
                                  baseline=baseline, blur_sigma=blur_sigma, cam_layer=cam_layer,
                                  overlay=overlay, outputs=outputs)
        return cv.saliency(self._unary("Saliency", req, timeout))

    # ------------------------------------------------------------ model control (ModelRepositoryService)

    def repository_index(self, *, ready_only: bool = False, timeout: float | None = None) -> list[RepositoryModel]:
        """Every model folder of the server's repository (each version) and embedded model, with its state."""
        resp = self._unary("RepositoryIndex", pb.RepositoryIndexRequest(ready_only=ready_only), timeout,
                           self._repository)
        return cv.repository_models(resp.models)

    def load_model(self, name: str, version: int | None = None, *, timeout: float | None = None
                   ) -> list[RepositoryModel]:
        """Load (or reload) a model folder: every version, or one; returns the model's versions after it.
        Calls in flight finish on the copy they started on. Needs an admin token when the server takes tokens."""
        req = pb.LoadModelRequest(**cv.model_target(name, version))
        return cv.repository_models(self._unary("LoadModel", req, timeout, self._repository).models)

    def unload_model(self, name: str, version: int | None = None, *, timeout: float | None = None
                     ) -> list[RepositoryModel]:
        """Stop serving a model (every version, or one): new calls get NotFoundError, calls in flight finish."""
        req = pb.UnloadModelRequest(**cv.model_target(name, version))
        return cv.repository_models(self._unary("UnloadModel", req, timeout, self._repository).models)

    # ------------------------------------------------------------ streaming RPCs

    def stream_maximize_unit(self, model: str, target: Target, *, timeout: float | None = None,
                             **options: Unpack[MaximizeOptions]) -> Iterator[Progress | MaximizeResult]:
        request = cv.maximize_request(model, target, options)
        return self._stream("MaximizeUnit", request, cv.maximize_result, timeout)

    def maximize_unit(self, model: str, target: Target, *, on_progress: ProgressCallback | None = None,
                      timeout: float | None = None, **options: Unpack[MaximizeOptions]) -> MaximizeResult:
        """Synthesise an image that excites a class logit or Unit (FFT parameterisation by default)."""
        events = self.stream_maximize_unit(model, target, timeout=timeout, **options)
        return self._drain("MaximizeUnit", events, on_progress)

    def stream_dream(self, image: ImageInput, model: str, layer: str | None = None, *, timeout: float | None = None,
                     **options: Unpack[DreamOptions]) -> Iterator[Progress | DreamResult]:
        request = cv.dream_request(image, model, layer, options)
        return self._stream("Dream", request, cv.dream_result, timeout)

    def dream(self, image: ImageInput, model: str, layer: str | None = None, *,
              on_progress: ProgressCallback | None = None, timeout: float | None = None,
              **options: Unpack[DreamOptions]) -> DreamResult:
        """DeepDream: amplify what `layer` (default: the model's dream layer) or one `channel` of it sees in
        the image, over octaves; `guide=` an image to dream toward its features instead."""
        events = self.stream_dream(image, model, layer, timeout=timeout, **options)
        return self._drain("Dream", events, on_progress)

    def stream_style_transfer(self, content: ImageInput, style: ImageInput, model: str, *,
                              timeout: float | None = None, **options: Unpack[StyleTransferOptions]
                              ) -> Iterator[Progress | StyleTransferResult]:
        request = cv.style_request(content, style, model, options)
        return self._stream("StyleTransfer", request, cv.style_result, timeout)

    def style_transfer(self, content: ImageInput, style: ImageInput, model: str, *,
                       on_progress: ProgressCallback | None = None, timeout: float | None = None,
                       **options: Unpack[StyleTransferOptions]) -> StyleTransferResult:
        """Gatys style transfer of `content` toward `style`'s texture (Adam by default, so it batches with other
        callers'); `soften=` "none" / "channels" / "positions" / "all" (Wang et al.'s softmax transform);
        `style_distance=` "mse" / "relative" (each layer's ||G - G_style||^2 / ||G_style||^2)."""
        events = self.stream_style_transfer(content, style, model, timeout=timeout, **options)
        return self._drain("StyleTransfer", events, on_progress)


class AsyncClient:
    """The asyncio twin of Client (grpc.aio): same constructor and methods, awaited; `async with` closes it.

    Create it inside a running event loop: grpc.aio channels belong to the loop they were made on.
    """

    def __init__(self, target: str = "localhost:50051", *, tls: TLSArg = False, token: str | None = None,
                 timeout: TimeoutArg = 30.0, max_message_mb: int = 64,
                 options: Sequence[tuple[str, Any]] = ()) -> None:
        self._config = ChannelConfig.build(target, tls=tls, token=token, timeout=timeout,
                                           max_message_mb=max_message_mb, options=options)
        creds, opts = self._config.credentials(), self._config.channel_options()
        self._channel = (grpc.aio.secure_channel(target, creds, opts) if creds is not None
                         else grpc.aio.insecure_channel(target, opts))
        self._stub = pb_grpc.InspectionServiceStub(self._channel)
        self._repository = pb_grpc.ModelRepositoryServiceStub(self._channel)

    def __repr__(self) -> str:
        return f"AsyncClient({self._config.target!r})"

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def health(self, service: str = "", timeout: float | None = None) -> str:
        """The server's gRPC health status ("SERVING", "NOT_SERVING", ...), or `service`'s."""
        check, request = _health_check(self._channel, service)
        try:
            reply = await check(request, metadata=self._config.metadata,
                                timeout=_pick(timeout, self._config.timeout.unary))
        except grpc.RpcError as err:
            raise _map_rpc_error(err) from err
        return _status_name(reply)

    # ------------------------------------------------------------ plumbing

    async def _unary(self, rpc: str, request: Any, timeout: float | None = None, stub: Any = None) -> Any:
        try:
            return await getattr(stub or self._stub, rpc)(
                request, timeout=_pick(timeout, self._config.timeout.unary), metadata=self._config.metadata)
        except grpc.RpcError as err:
            raise _map_rpc_error(err) from err

    async def _stream(self, rpc: str, request: Any, decode: Callable[[Any], R],
                      timeout: float | None) -> AsyncGenerator[Progress | R, None]:
        call = getattr(self._stub, rpc)(request, timeout=_pick(timeout, self._config.timeout.stream),
                                        metadata=self._config.metadata)
        try:
            result = None
            async for resp in call:
                event = cv.stream_event(resp, decode)
                if isinstance(event, Progress):
                    yield event
                elif event is not None:
                    result = event  # as in Client._stream: the call's status first, then the result
            if result is not None:
                yield result
        except grpc.RpcError as err:
            raise _map_rpc_error(err) from err
        finally:
            call.cancel()

    @staticmethod
    async def _drain(rpc: str, events: AsyncIterator[Progress | R],
                     on_progress: ProgressCallback | None) -> R:
        try:
            async for event in events:
                if not isinstance(event, Progress):
                    return event
                if on_progress is not None:
                    maybe = on_progress(event)
                    if inspect.isawaitable(maybe):
                        await maybe
        finally:
            if isinstance(events, AsyncGenerator):
                await events.aclose()
        raise _no_result(rpc)

    # ------------------------------------------------------------ unary RPCs (see Client for docs)

    async def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        resp = await self._unary("ListModels", pb.ListModelsRequest(), timeout)
        return [cv.model_info(m) for m in resp.models]

    async def get_model(self, model: str, *, timeout: float | None = None) -> ModelDetails:
        return cv.model_details(await self._unary("GetModel", pb.GetModelRequest(model=model), timeout))

    async def get_filters(self, model: str, layer: str, *, grid: bool = False, scaling: str = "minmax",
                          max_filters: int | None = None, max_input_channels: int | None = None,
                          cell_scale: int | None = None, timeout: float | None = None) -> Filters:
        req = cv.filters_request(model, layer, grid=grid, scaling=scaling, max_filters=max_filters,
                                 max_input_channels=max_input_channels, cell_scale=cell_scale)
        return cv.filters(await self._unary("GetFilters", req, timeout))

    async def top_activations(self, model: str, layer: str, channel: int, *, k: int = 9,
                              dataset: str | None = "samples", ranking: str = "max", max_per_image: int = 1,
                              images: Sequence[ImageInput] | None = None, crops: bool = False,
                              include_images: bool = False, outputs: Sequence[str] | None = None,
                              timeout: float | None = None) -> TopActivations:
        req = cv.top_activations_request(model, layer, channel, k=k, dataset=dataset, images=images,
                                         crops=crops, include_images=include_images, ranking=ranking,
                                         max_per_image=max_per_image, outputs=outputs)
        return cv.top_activations(await self._unary("TopActivations", req, timeout))

    async def list_datasets(self, *, timeout: float | None = None) -> list[DatasetInfo]:
        return cv.datasets(await self._unary("ListDatasets", pb.ListDatasetsRequest(), timeout))

    async def saliency(self, image: ImageInput, model: str, *, target: Target | None = None,
                       method: str = "gradient", samples: int | None = None, noise_level: float | None = None,
                       base_method: str | None = None, seed: int | None = None, steps: int | None = None,
                       baseline: str | ImageInput | None = None, blur_sigma: float | None = None,
                       cam_layer: str | None = None, overlay: bool = True, outputs: Sequence[str] | None = None,
                       timeout: float | None = None) -> SaliencyResult:
        req = cv.saliency_request(image, model, target=target, method=method, samples=samples,
                                  noise_level=noise_level, base_method=base_method, seed=seed, steps=steps,
                                  baseline=baseline, blur_sigma=blur_sigma, cam_layer=cam_layer,
                                  overlay=overlay, outputs=outputs)
        return cv.saliency(await self._unary("Saliency", req, timeout))

    # ------------------------------------------------------------ model control (see Client for docs)

    async def repository_index(self, *, ready_only: bool = False, timeout: float | None = None
                               ) -> list[RepositoryModel]:
        resp = await self._unary("RepositoryIndex", pb.RepositoryIndexRequest(ready_only=ready_only), timeout,
                                 self._repository)
        return cv.repository_models(resp.models)

    async def load_model(self, name: str, version: int | None = None, *, timeout: float | None = None
                         ) -> list[RepositoryModel]:
        req = pb.LoadModelRequest(**cv.model_target(name, version))
        return cv.repository_models((await self._unary("LoadModel", req, timeout, self._repository)).models)

    async def unload_model(self, name: str, version: int | None = None, *, timeout: float | None = None
                           ) -> list[RepositoryModel]:
        req = pb.UnloadModelRequest(**cv.model_target(name, version))
        return cv.repository_models((await self._unary("UnloadModel", req, timeout, self._repository)).models)

    # ------------------------------------------------------------ streaming RPCs

    def stream_maximize_unit(self, model: str, target: Target, *, timeout: float | None = None,
                             **options: Unpack[MaximizeOptions]) -> AsyncIterator[Progress | MaximizeResult]:
        request = cv.maximize_request(model, target, options)
        return self._stream("MaximizeUnit", request, cv.maximize_result, timeout)

    async def maximize_unit(self, model: str, target: Target, *, on_progress: ProgressCallback | None = None,
                            timeout: float | None = None,
                            **options: Unpack[MaximizeOptions]) -> MaximizeResult:
        events = self.stream_maximize_unit(model, target, timeout=timeout, **options)
        return await self._drain("MaximizeUnit", events, on_progress)

    def stream_dream(self, image: ImageInput, model: str, layer: str | None = None, *, timeout: float | None = None,
                     **options: Unpack[DreamOptions]) -> AsyncIterator[Progress | DreamResult]:
        request = cv.dream_request(image, model, layer, options)
        return self._stream("Dream", request, cv.dream_result, timeout)

    async def dream(self, image: ImageInput, model: str, layer: str | None = None, *,
                    on_progress: ProgressCallback | None = None, timeout: float | None = None,
                    **options: Unpack[DreamOptions]) -> DreamResult:
        events = self.stream_dream(image, model, layer, timeout=timeout, **options)
        return await self._drain("Dream", events, on_progress)

    def stream_style_transfer(self, content: ImageInput, style: ImageInput, model: str, *,
                              timeout: float | None = None, **options: Unpack[StyleTransferOptions]
                              ) -> AsyncIterator[Progress | StyleTransferResult]:
        request = cv.style_request(content, style, model, options)
        return self._stream("StyleTransfer", request, cv.style_result, timeout)

    async def style_transfer(self, content: ImageInput, style: ImageInput, model: str, *,
                             on_progress: ProgressCallback | None = None, timeout: float | None = None,
                             **options: Unpack[StyleTransferOptions]) -> StyleTransferResult:
        events = self.stream_style_transfer(content, style, model, timeout=timeout, **options)
        return await self._drain("StyleTransfer", events, on_progress)
