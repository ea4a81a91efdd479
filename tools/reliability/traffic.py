"""Valid mixed traffic over every RPC for the reliability drivers (soak, overload), on the small-model server
of tools/reliability/tiny.py, and what a server process holds (RSS, open files, threads) read from /proc."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from google.protobuf.message import Message

from convlens.v1 import convlens_pb2 as pb
from tools.reliability.fuzz import SERVICE, STREAMS
from tools.reliability.strategies import png
from tools.reliability.tiny import EAGER

_RNG = np.random.default_rng(3)
_IMAGE = pb.Image(encoded=png(_RNG.integers(0, 256, (48, 40, 3), dtype=np.uint8)))
_STYLE = pb.Image(encoded=png(_RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)))

# One valid request per RPC (each computes on the eager resnet18 at 32 px), and how often each is sent.
MIX: list[tuple[str, Message, int]] = [
    ("ListModels", pb.ListModelsRequest(), 1),
    ("ListDatasets", pb.ListDatasetsRequest(), 1),
    ("GetModel", pb.GetModelRequest(model=EAGER), 2),
    ("GetFilters", pb.GetFiltersRequest(model=EAGER, layer="conv1", render_grid=True), 2),
    ("TopActivations", pb.TopActivationsRequest(model=EAGER, layer="layer1", channel=3, k=3, dataset="tiny",
                                                include_crops=True), 2),
    ("Saliency", pb.SaliencyRequest(model=EAGER, image=_IMAGE), 6),
    ("MaximizeUnit", pb.MaximizeUnitRequest(model=EAGER, target=pb.Target(class_index=1), steps=4, size=32), 2),
    ("Dream", pb.DreamRequest(model=EAGER, image=_IMAGE, layer="layer2", octaves=1, steps_per_octave=3,
                              max_size=32), 2),
    ("StyleTransfer", pb.StyleTransferRequest(model=EAGER, content=_IMAGE, style=_STYLE, steps=3, size=32), 2),
]
SCHEDULE = [(rpc, request) for rpc, request, weight in MIX for _ in range(weight)]


@dataclass
class Tally:
    codes: Counter[tuple[str, str]] = field(default_factory=Counter)
    latencies: list[tuple[str, str, float]] = field(default_factory=list)  # (rpc, code, seconds)

    def errors(self) -> int:
        return sum(n for (_, code), n in self.codes.items() if code != "OK")


async def send(channel: grpc.aio.Channel, rpc: str, request: Message, timeout: float, tally: Tally) -> str:
    response = getattr(pb, SERVICE.methods_by_name[rpc].output_type.name)
    kind = channel.unary_stream if rpc in STREAMS else channel.unary_unary
    method = kind(f"/{SERVICE.full_name}/{rpc}", request_serializer=type(request).SerializeToString,
                  response_deserializer=response.FromString)
    start = time.monotonic()
    code = "OK"
    try:
        if rpc in STREAMS:
            async for _ in method(request, timeout=timeout):
                pass
        else:
            await method(request, timeout=timeout)
    except grpc.aio.AioRpcError as err:
        code = err.code().name
    tally.codes[(rpc, code)] += 1
    tally.latencies.append((rpc, code, time.monotonic() - start))
    return code


async def closed_loop(address: str, workers: int, seconds: float, timeout: float = 30.0) -> Tally:
    """`workers` callers, each sending the mix back to back for `seconds`: the server's capacity."""
    tally = Tally()
    end = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(address) as channel:
        async def worker(i: int) -> None:
            n = i
            while time.monotonic() < end:
                rpc, request = SCHEDULE[n % len(SCHEDULE)]
                await send(channel, rpc, request, timeout, tally)
                n += workers

        await asyncio.gather(*(worker(i) for i in range(workers)))
    return tally


async def open_loop(address: str, rate: float, seconds: float, timeout: float, tally: Tally,
                    schedule: list[tuple[str, Message]] | None = None,
                    every: Callable[[], None] | None = None) -> None:
    """Calls started at `rate` per second for `seconds`, whatever the answers take (offered load)."""
    schedule = schedule or SCHEDULE
    pending: set[asyncio.Task[str]] = set()
    start = time.monotonic()
    async with grpc.aio.insecure_channel(address) as channel:
        n = 0
        while (now := time.monotonic()) < start + seconds:
            due = start + n / rate
            if due > now:
                await asyncio.sleep(due - now)  # pacing the offered load, not waiting for a result
            rpc, request = schedule[n % len(schedule)]
            task = asyncio.create_task(send(channel, rpc, request, timeout, tally))
            pending.add(task)
            task.add_done_callback(pending.discard)
            n += 1
            if every is not None:
                every()
        if pending:
            await asyncio.gather(*pending)


def holdings(pid: int) -> dict[str, float]:
    """RSS (MB), open file descriptors and threads of process `pid`."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {"rss_mb": int(fields["VmRSS"].split()[0]) / 1024, "fds": len(list(Path(f"/proc/{pid}/fd").iterdir())),
            "threads": int(fields["Threads"])}
