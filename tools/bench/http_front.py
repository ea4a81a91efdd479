"""What the HTTP front costs beside gRPC, on one server process (`python -m tools.bench.http_front`).

A: per-call overhead — ListModels (never reaches the scheduler) one call at a time, gRPC (sync stub) and
HTTP/JSON (httpx, keep-alive) alternating in blocks, p50 per block. B: Saliency (EfficientNet-Lite0, 224 px,
gradient) throughput at a fixed concurrency, gRPC (grpc.aio) and HTTP/JSON (httpx.AsyncClient) in
interleaved rounds, and the bytes of one answer each way. Ratios within a round are what to compare (the
machine is shared); the load average is printed beside them.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import time

import grpc
import httpx
import numpy as np
from google.protobuf import json_format
from PIL import Image

from convlens.server.launcher import ServerProcess, free_port
from convlens.v1 import convlens_pb2 as pb
from convlens.v1 import convlens_pb2_grpc as pb_grpc
from tools.common import MODEL, load_average

RPC = "/convlens.v1.InspectionService/"


def _png() -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def overhead(srv: ServerProcess, http_port: int, rounds: int, calls: int) -> list[tuple[float, float]]:
    out = []
    with grpc.insecure_channel(srv.address) as channel, httpx.Client(base_url=f"http://127.0.0.1:{http_port}") as h:
        stub = pb_grpc.InspectionServiceStub(channel)
        for _ in range(rounds):
            g, t = [], []
            for _ in range(calls):
                s = time.perf_counter()
                stub.ListModels(pb.ListModelsRequest(), timeout=10)
                g.append(time.perf_counter() - s)
            for _ in range(calls):
                s = time.perf_counter()
                h.post(RPC + "ListModels", content="{}").raise_for_status()
                t.append(time.perf_counter() - s)
            out.append((statistics.median(g), statistics.median(t)))
    return out


async def _throughput(call: object, concurrency: int, seconds: float) -> float:
    done = 0
    end = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < end:
            await call()  # type: ignore[operator]
            done += 1
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.perf_counter() - start)


async def saliency(srv: ServerProcess, http_port: int, rounds: int, seconds: float, concurrency: int
                   ) -> tuple[list[tuple[float, float]], int, int]:
    request = pb.SaliencyRequest(model=MODEL, image=pb.Image(encoded=_png()),
                                 method=pb.SALIENCY_METHOD_GRADIENT)
    body = json_format.MessageToJson(request)
    out = []
    async with grpc.aio.insecure_channel(srv.address) as channel, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}", timeout=120,
                              limits=httpx.Limits(max_connections=concurrency)) as h:
        stub = pb_grpc.InspectionServiceStub(channel)

        async def by_grpc() -> None:
            await stub.Saliency(request, timeout=120)

        async def by_http() -> None:
            (await h.post(RPC + "Saliency", content=body)).raise_for_status()
        grpc_bytes = (await stub.Saliency(request)).ByteSize()
        http_bytes = len((await h.post(RPC + "Saliency", content=body)).content)
        await _throughput(by_grpc, concurrency, seconds / 2)  # warm-up: replicas, shards, connections
        await _throughput(by_http, concurrency, seconds / 2)
        for _ in range(rounds):
            out.append((await _throughput(by_grpc, concurrency, seconds),
                        await _throughput(by_http, concurrency, seconds)))
    return out, grpc_bytes, http_bytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--concurrency", type=int, default=8)
    args = p.parse_args()
    http_port = free_port()
    with ServerProcess(["--device", "cpu", "--http-port", str(http_port)]) as srv:
        print(f"load average {load_average(sep=' ')}")
        for g, h in overhead(srv, http_port, args.rounds, args.calls):
            print(f"ListModels p50: gRPC {g * 1e3:.2f} ms, HTTP {h * 1e3:.2f} ms (HTTP/gRPC {h / g:.2f})")
        rates, gb, hb = asyncio.run(saliency(srv, http_port, args.rounds, args.seconds, args.concurrency))
        for g, h in rates:
            print(f"Saliency c{args.concurrency}: gRPC {g:.1f}/s, HTTP {h:.1f}/s (HTTP/gRPC {h / g:.2f})")
        print(f"one Saliency answer: gRPC {gb} bytes, HTTP/JSON {hb} bytes ({hb / gb:.2f}x)")
        print(f"load average {load_average(sep=' ')}")


if __name__ == "__main__":
    main()
