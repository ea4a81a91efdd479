"""The plain peer: what a user writes in an afternoon. grpc.aio + torch, ConvLens's own proto messages.

`--workers` threads (default 2, the cores), each with one intra-op thread and a model replica of its own
(channels_last), each computing one request at a time; no batching, no admission control, no metrics.
Saliency answers the heatmap + predictions (tools/peers/work.py); MaximizeUnit runs one job per request
and streams only its result.

    python -m tools.peers.plain_server --port 51700 [--model efficientnet_lite0 | --model MODEL_DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import torch

from convlens.server.models.model import ServedModel
from convlens.v1 import convlens_pb2 as pb
from convlens.v1 import convlens_pb2_grpc as pb_grpc
from tools.common import MODEL
from tools.peers import work


class PlainServicer(pb_grpc.InspectionServiceServicer):
    def __init__(self, model: str, workers: int) -> None:
        self.local = threading.local()
        self.model_name = model
        self.base = work.load(model)

        def init() -> None:
            torch.set_num_threads(1)
            self.local.model = self.base.replica(torch.device("cpu"), fresh=True)

        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="peer-worker", initializer=init)

    def _model(self) -> ServedModel:
        model: ServedModel = self.local.model
        return model

    def _saliency(self, request: pb.SaliencyRequest) -> pb.SaliencyResponse:
        model = self._model()
        return work.saliency(model, [work.decode(request, model)])[0]

    async def Saliency(self, request: pb.SaliencyRequest, context: Any) -> pb.SaliencyResponse:  # noqa: N802
        return await asyncio.get_running_loop().run_in_executor(self.pool, self._saliency, request)

    async def MaximizeUnit(self, request: pb.MaximizeUnitRequest, context: Any  # noqa: N802
                           ) -> AsyncIterator[pb.MaximizeUnitResponse]:
        yield await asyncio.get_running_loop().run_in_executor(
            self.pool, lambda: work.maximize(self._model(), request))


async def serve(port: int, model: str, workers: int) -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20),
                                      ("grpc.max_send_message_length", 64 << 20)])
    pb_grpc.add_InspectionServiceServicer_to_server(PlainServicer(model, workers), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"READY {port}", flush=True)
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default=MODEL, help="efficientnet_lite0 or a model folder")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)  # no OpenMP team on the main thread (see convlens' scheduler/shards.py)
    asyncio.run(serve(args.port, args.model, args.workers))


if __name__ == "__main__":
    main()
