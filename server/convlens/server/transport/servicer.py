"""The InspectionService servicer: each handler converts the request, delegates, converts the answer.

Request/response conversion lives in `codecs/<rpc>.py`, behaviour in `service/<rpc>.py`. An RPC without a
handler here answers UNIMPLEMENTED (transport/unimplemented.py). A streaming handler closes its service's
stream when it is itself closed (the caller went away while an event was on its way out), so the job's slot
is released then, not whenever the garbage collector finalizes the abandoned generator.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

import grpc

from convlens.server.service import Services
from convlens.server.transport.codecs import (
    catalog,
    dream,
    filters,
    maximize,
    saliency,
    style,
    top_activations,
)
from convlens.server.transport.codecs.common import deadline
from convlens.server.transport.unimplemented import answer_unimplemented
from convlens.v1 import convlens_pb2 as pb
from convlens.v1 import convlens_pb2_grpc as pb_grpc

Context = grpc.aio.ServicerContext


@answer_unimplemented(pb.DESCRIPTOR.services_by_name["InspectionService"])
class InspectionServicer(pb_grpc.InspectionServiceServicer):
    def __init__(self, services: Services) -> None:
        self.services = services

    async def ListModels(self, request: pb.ListModelsRequest, context: Context) -> pb.ListModelsResponse:
        return catalog.list_models_response(self.services.catalog.list_models())

    async def GetModel(self, request: pb.GetModelRequest, context: Context) -> pb.GetModelResponse:
        return catalog.get_model_response(self.services.catalog.get_model(request.model))

    async def GetFilters(self, request: pb.GetFiltersRequest, context: Context) -> pb.GetFiltersResponse:
        answer = await self.services.filters(request.model, filters.query(request), deadline(context))
        return filters.response(answer)

    async def Saliency(self, request: pb.SaliencyRequest, context: Context) -> pb.SaliencyResponse:
        answer = await self.services.saliency(saliency.query(request), deadline(context))
        return saliency.response(answer)

    async def TopActivations(self, request: pb.TopActivationsRequest, context: Context) -> pb.TopActivationsResponse:
        answer = await self.services.top_activations(top_activations.query(request), deadline(context))
        return top_activations.response(answer)

    async def ListDatasets(self, request: pb.ListDatasetsRequest, context: Context) -> pb.ListDatasetsResponse:
        return top_activations.datasets_response(await self.services.top_activations.list_datasets())

    async def MaximizeUnit(self, request: pb.MaximizeUnitRequest, context: Context
                           ) -> AsyncIterator[pb.MaximizeUnitResponse]:
        async with aclosing(self.services.maximize(maximize.query(request), deadline(context))) as events:
            async for event in events:
                yield maximize.response(event)

    async def Dream(self, request: pb.DreamRequest, context: Context) -> AsyncIterator[pb.DreamResponse]:
        async with aclosing(self.services.dream(dream.query(request), deadline(context))) as events:
            async for event in events:
                yield dream.response(event)

    async def StyleTransfer(self, request: pb.StyleTransferRequest, context: Context
                            ) -> AsyncIterator[pb.StyleTransferResponse]:
        async with aclosing(self.services.style(style.query(request), deadline(context))) as events:
            async for event in events:
                yield style.response(event)
