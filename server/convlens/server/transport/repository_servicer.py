"""The ModelRepositoryService servicer (model control): convert, delegate to service/model_control.py, convert.

Who may call LoadModel / UnloadModel (admin tokens) and the audit line are the interceptor's business.
"""

from __future__ import annotations

import grpc

from convlens.server.service.model_control import ModelControl
from convlens.server.transport.codecs import repository
from convlens.server.transport.unimplemented import answer_unimplemented
from convlens.v1 import convlens_pb2 as pb
from convlens.v1 import convlens_pb2_grpc as pb_grpc

Context = grpc.aio.ServicerContext


@answer_unimplemented(pb.DESCRIPTOR.services_by_name["ModelRepositoryService"])
class ModelRepositoryServicer(pb_grpc.ModelRepositoryServiceServicer):
    def __init__(self, control: ModelControl) -> None:
        self.control = control

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Context
                              ) -> pb.RepositoryIndexResponse:
        return repository.index_response(await self.control.read_index(request.ready_only), self.control.mode)

    async def LoadModel(self, request: pb.LoadModelRequest, context: Context) -> pb.LoadModelResponse:
        return pb.LoadModelResponse(models=repository.entries(await self.control.load(*repository.target(request))))

    async def UnloadModel(self, request: pb.UnloadModelRequest, context: Context) -> pb.UnloadModelResponse:
        return pb.UnloadModelResponse(
            models=repository.entries(await self.control.unload(*repository.target(request))))
