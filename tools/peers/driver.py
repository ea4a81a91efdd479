"""One load driver for every server: the same closed loop, the same request bytes, over gRPC or HTTP.

Requests are serialised once; gRPC calls go through a generic bytes-in / bytes-out method (no client-side
(de)serialisation), HTTP calls POST the same bytes (aiohttp). Each level: `n` callers call back to back for
`warmup` seconds (not counted), then `duration` seconds (calls completing inside the window count), while
the server's process tree is sampled for CPU time at the window's edges.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import aiohttp
import grpc
import numpy as np

SERVICE = "/convlens.v1.InspectionService/"
OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


class Caller:
    """Saliency and MaximizeUnit of one server, bytes in, the answer's bytes out."""

    async def saliency(self, body: bytes) -> bytes:
        raise NotImplementedError

    async def maximize(self, body: bytes) -> bytes:
        """The final MaximizeUnitResponse (its result)."""
        raise NotImplementedError

    async def close(self) -> None:
        pass


class GrpcCaller(Caller):
    def __init__(self, address: str) -> None:
        self.channel = grpc.aio.insecure_channel(address, options=OPTIONS)
        self._saliency = self.channel.unary_unary(SERVICE + "Saliency")
        self._maximize = self.channel.unary_stream(SERVICE + "MaximizeUnit")

    async def saliency(self, body: bytes) -> bytes:
        out: bytes = await self._saliency(body)
        return out

    async def maximize(self, body: bytes) -> bytes:
        last = b""
        async for message in self._maximize(body):
            last = message
        return last

    async def close(self) -> None:
        await self.channel.close()


class HttpCaller(Caller):
    def __init__(self, base_url: str) -> None:
        self.base = base_url.rstrip("/")
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                             timeout=aiohttp.ClientTimeout(total=3600))

    async def _post(self, route: str, body: bytes) -> bytes:
        async with self.session.post(f"{self.base}/{route}", data=body,
                                     headers={"content-type": "application/x-protobuf"}) as resp:
            data = await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status} from {self.base}/{route}: {data[:200]!r}")
            return data

    async def saliency(self, body: bytes) -> bytes:
        return await self._post("saliency", body)

    async def maximize(self, body: bytes) -> bytes:
        return await self._post("maximize", body)

    async def close(self) -> None:
        await self.session.close()


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, user + system CPU seconds) from /proc, None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its live descendants (Ray's workers are the raylet's)."""
    stats = {int(p): s for p in os.listdir("/proc") if p.isdigit() and (s := _stat(int(p))) is not None}
    if pid not in stats:
        return math.nan
    children: dict[int, list[int]] = {}
    for p, (parent, _) in stats.items():
        children.setdefault(parent, []).append(p)
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += stats[p][1]
        todo += children.get(p, [])
    return total


@dataclass(frozen=True)
class Level:
    concurrency: int
    ok: int
    errors: int
    throughput: float
    p50_ms: float
    p99_ms: float
    server_cpu_s: float  # the server's process tree, over the window

    @property
    def cpu_ms_per_answer(self) -> float:
        return 1e3 * self.server_cpu_s / self.ok if self.ok else math.nan


async def level(call: Callable[[bytes], Awaitable[bytes]], bodies: Sequence[bytes], n: int, warmup: float,
                duration: float, pid: int) -> Level:
    loop_start = time.perf_counter()
    start, end = loop_start + warmup, loop_start + warmup + duration
    latencies: list[float] = []
    errors = 0

    async def caller(i: int) -> None:
        nonlocal errors
        k = i
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            failed = False
            try:
                await call(bodies[k % len(bodies)])
            except Exception:  # counted; a refusing server must not make the callers spin
                failed = True
            k += n
            t1 = time.perf_counter()
            if start <= t1 <= end:
                if failed:
                    errors += 1
                else:
                    latencies.append(t1 - t0)
            if failed:
                await asyncio.sleep(0.05)

    tasks = [asyncio.create_task(caller(i)) for i in range(n)]
    await asyncio.sleep(max(0.0, start - time.perf_counter()))
    cpu0 = tree_cpu_seconds(pid)
    await asyncio.sleep(max(0.0, end - time.perf_counter()))
    cpu1 = tree_cpu_seconds(pid)
    await asyncio.gather(*tasks)
    ms = np.asarray(latencies) * 1e3
    p50, p99 = np.percentile(ms, [50, 99]).tolist() if ms.size else [math.nan, math.nan]
    return Level(n, len(latencies), errors, len(latencies) / duration, p50, p99, cpu1 - cpu0)
