"""The InspectionService servicer: converts messages, delegates to the Inspector, converts back."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from convlens.server.engine.render import encode_png
from convlens.server.errors import Unimplemented
from convlens.server.service import Inspector, SaliencyQuery, deadline_from_timeout
from convlens.server.transport import codecs
from convlens.v1 import convlens_pb2 as pb
from convlens.v1 import convlens_pb2_grpc as pb_grpc


def _not_yet(rpc: str) -> Unimplemented:
    return Unimplemented(f"{rpc} is part of the v1 contract but not implemented by this server yet; "
                         "available now: ListModels, GetModel, GetFilters, Saliency")


class InspectionServicer(pb_grpc.InspectionServiceServicer):
    def __init__(self, inspector: Inspector) -> None:
        self.inspector = inspector

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[codecs.model_info(m) for m in self.inspector.list_models()])

    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> pb.GetModelResponse:
        model = self.inspector.get_model(request.model)
        return pb.GetModelResponse(model=codecs.model_info(model),
                                   layers=[codecs.layer_info(s) for s in model.layers], labels=model.labels)

    async def GetFilters(self, request: pb.GetFiltersRequest, context: grpc.aio.ServicerContext
                         ) -> pb.GetFiltersResponse:
        answer = await self.inspector.get_filters(request.model, codecs.filters_query(request),
                                                  deadline_from_timeout(context.time_remaining()))
        f = answer.filters
        return pb.GetFiltersResponse(
            weights=codecs.tensor(f.weights), bias=codecs.tensor(f.bias) if f.bias is not None else None,
            grid_png=encode_png(answer.grid) if answer.grid is not None else b"",
            dead_channels=f.dead_channels, layer_type=f.layer_type, groups=f.groups,
            stride=list(f.stride), padding=list(f.padding), dilation=list(f.dilation))

    async def Saliency(self, request: pb.SaliencyRequest, context: grpc.aio.ServicerContext) -> pb.SaliencyResponse:
        query = SaliencyQuery(
            model=request.model,
            image=codecs.image_input(request.image, "image") if request.HasField("image") else None,
            target=codecs.target(request.target, request.HasField("target")),
            options=codecs.saliency_options(request),
            baseline_image=(codecs.image_input(request.baseline_image, "baseline_image")
                            if request.HasField("baseline_image") else None),
            render_overlay=request.render_overlay,
        )
        answer = await self.inspector.saliency(query, deadline_from_timeout(context.time_remaining()))
        r = answer.result
        return pb.SaliencyResponse(
            attribution=codecs.tensor(r.attribution.numpy()), heatmap=codecs.tensor(r.heatmap.numpy()),
            overlay_png=encode_png(answer.overlay) if answer.overlay is not None else b"",
            predictions=[codecs.prediction(p) for p in answer.predictions],
            geometry=codecs.geometry(answer.geometry), target=codecs.target_message(r.target),
            target_value=r.target_value, modified_activations=r.modified_activations, notes=answer.notes,
            baseline_value=r.baseline_value)

    async def TopActivations(self, request: pb.TopActivationsRequest, context: grpc.aio.ServicerContext
                             ) -> pb.TopActivationsResponse:
        raise _not_yet("TopActivations")

    async def MaximizeUnit(self, request: pb.MaximizeUnitRequest, context: grpc.aio.ServicerContext
                           ) -> AsyncIterator[pb.MaximizeUnitResponse]:
        raise _not_yet("MaximizeUnit")
        yield  # a generator: a server-streaming handler

    async def Dream(self, request: pb.DreamRequest, context: grpc.aio.ServicerContext
                    ) -> AsyncIterator[pb.DreamResponse]:
        raise _not_yet("Dream")
        yield

    async def StyleTransfer(self, request: pb.StyleTransferRequest, context: grpc.aio.ServicerContext
                            ) -> AsyncIterator[pb.StyleTransferResponse]:
        raise _not_yet("StyleTransfer")
        yield
