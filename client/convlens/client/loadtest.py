"""Closed-loop load tester: a concurrency sweep against one RPC, with the server's own time split.

For each concurrency level N, N callers issue the RPC back to back (asyncio, AsyncClient) for `warmup`
seconds (not counted), then for `duration` seconds (counted: calls that complete inside the window).
Reported per level: ok count, throughput, latency p50/p90/p99, errors by status code, and, when the
server's Prometheus endpoint is given, where the server spent its time: the mean queue wait per task, the
mean compute time per batch and the mean batch size, from the scheduler histograms' Δsum/Δcount over the
window. A tiny text parser reads the exposition format, so the SDK needs no prometheus_client.

    from convlens.client.loadtest import LoadTestConfig, run_loadtest, format_table
    print(format_table(run_loadtest(LoadTestConfig(concurrency=(1, 8), duration=10))))
"""

from __future__ import annotations

import asyncio
import csv
import io
import logging
import math
import re
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from convlens.v1 import convlens_pb2 as pb

from . import _convert as cv
from ._client import AsyncClient
from ._config import TLSArg
from ._exceptions import ConvLensError
from ._images import pil_to_png
from ._types import ImageInput

__all__ = [
    "RPCS",
    "LevelResult",
    "LoadTestConfig",
    "Sample",
    "format_table",
    "parse_metrics",
    "run_loadtest",
    "run_loadtest_async",
    "server_split",
    "synthetic_image",
    "write_csv",
]

log = logging.getLogger(__name__)

# CLI/config name -> the RPC's name in the contract, which is also the scheduler metrics' `rpc` label.
RPCS: dict[str, str] = {"saliency": "Saliency", "get_filters": "GetFilters", "list_models": "ListModels"}


@dataclass(frozen=True)
class LoadTestConfig:
    target: str = "localhost:50051"
    rpc: str = "saliency"
    model: str = "efficientnet_lite0"
    layer: str = "_conv_stem"  # get_filters
    image: ImageInput | None = None  # saliency; None: synthetic_image()
    method: str = "gradient"  # saliency
    class_target: int | None = None  # saliency; None: the top-1 class
    # saliency: the outputs asked for (SaliencyRequest.outputs); the sweep measures serving a heatmap with
    # its predictions, not shipping the 600 kB attribution. None: the server's default answer.
    outputs: tuple[str, ...] | None = ("heatmap", "predictions")
    concurrency: tuple[int, ...] = (1, 4, 16, 32)
    duration: float = 20.0
    warmup: float = 2.0
    metrics_url: str | None = None  # e.g. http://host:9464/metrics
    channels: int = 1  # callers share this many channels (connections) round-robin
    tls: TLSArg = False
    token: str | None = None
    timeout: float = 30.0


@dataclass(frozen=True)
class LevelResult:
    concurrency: int
    duration_s: float
    ok: int
    errors: dict[str, int]  # status code name -> count
    throughput: float  # ok calls per second
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    # From the server's metrics (None without metrics_url, or when nothing was scheduled, e.g. ListModels).
    queue_wait_ms: float | None = None  # mean per task
    compute_ms_per_batch: float | None = None
    mean_batch_size: float | None = None

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


# ---------------------------------------------------------------- Prometheus text format


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str] = field(default_factory=dict)
    value: float = 0.0


_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?\s*$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def parse_metrics(text: str) -> list[Sample]:
    """Parse `name{label="v",...} value [timestamp]` lines; comments and malformed lines are skipped."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            continue
        name, body, raw = m.groups()
        labels = {k: re.sub(r'\\[\\"n]', lambda e: _UNESCAPE[e.group(0)], v)
                  for k, v in _LABEL.findall(body or "")}
        try:
            value = float(raw)  # also "+Inf", "-Inf", "NaN"
        except ValueError:
            continue
        out.append(Sample(name, labels, value))
    return out


def _total(samples: Iterable[Sample], name: str, labels: dict[str, str]) -> float:
    return sum(s.value for s in samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def server_split(before: Sequence[Sample], after: Sequence[Sample], *, rpc: str,
                 model: str | None = None) -> tuple[float | None, float | None, float | None]:
    """(mean queue wait ms per task, mean compute ms per batch, mean batch size) between two scrapes."""
    labels = {"rpc": rpc} | ({"model": model} if model else {})

    def mean(family: str) -> float | None:
        d_count = _total(after, family + "_count", labels) - _total(before, family + "_count", labels)
        d_sum = _total(after, family + "_sum", labels) - _total(before, family + "_sum", labels)
        return d_sum / d_count if d_count > 0 else None

    wait, compute = mean("convlens_scheduler_queue_wait_seconds"), mean("convlens_scheduler_compute_seconds")
    return (None if wait is None else wait * 1e3, None if compute is None else compute * 1e3,
            mean("convlens_scheduler_batch_size"))


def _scrape(url: str) -> list[Sample] | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return parse_metrics(resp.read().decode("utf-8", "replace"))
    except OSError as e:  # the sweep is still worth having without the server's split
        log.warning("metrics scrape of %s failed: %s", url, e)
        return None


# ---------------------------------------------------------------- the load


def synthetic_image(size: int = 224, seed: int = 0) -> npt.NDArray[np.uint8]:
    """A deterministic RGB test pattern (gradients, rings, noise): no dataset package needed."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    r = np.hypot(yy - 0.5, xx - 0.5)
    noise = np.random.default_rng(seed).normal(0.0, 20.0, (size, size, 3))
    rgb = np.stack([255 * xx, 255 * yy, 127.5 * (1 + np.sin(40 * r))], axis=-1) + noise
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _request(cfg: LoadTestConfig) -> Any:
    if cfg.rpc == "saliency":
        image: ImageInput = (cfg.image if cfg.image is not None
                             else pil_to_png(Image.fromarray(synthetic_image())))
        return cv.saliency_request(image, cfg.model, target=cfg.class_target, method=cfg.method, samples=None,
                                   noise_level=None, base_method=None, seed=None, steps=None, baseline=None,
                                   blur_sigma=None, cam_layer=None, overlay=False, outputs=cfg.outputs)
    if cfg.rpc == "get_filters":
        return cv.filters_request(cfg.model, cfg.layer, grid=False, scaling="minmax", max_filters=None,
                                  max_input_channels=None, cell_scale=None)
    if cfg.rpc == "list_models":
        return pb.ListModelsRequest()
    raise ValueError(f"unknown rpc {cfg.rpc!r}; choose one of {', '.join(RPCS)}")


async def _level(calls: Sequence[Callable[[], Awaitable[Any]]], cfg: LoadTestConfig, n: int) -> LevelResult:
    loop_start = time.perf_counter()
    start, end = loop_start + cfg.warmup, loop_start + cfg.warmup + cfg.duration
    latencies: list[float] = []
    errors: Counter[str] = Counter()

    async def caller(call: Callable[[], Awaitable[Any]]) -> None:
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            code = None
            try:
                await call()
            except ConvLensError as e:
                code = e.code.name
            t1 = time.perf_counter()
            if start <= t1 <= end:  # completed inside the measured window
                if code is None:
                    latencies.append(t1 - t0)
                else:
                    errors[code] += 1
            if code is not None:
                await asyncio.sleep(0.01)  # a refusing or absent server must not make callers spin

    tasks = [asyncio.create_task(caller(calls[i % len(calls)])) for i in range(n)]
    before = after = None
    await asyncio.sleep(max(0.0, start - time.perf_counter()))
    if cfg.metrics_url:
        before = await asyncio.to_thread(_scrape, cfg.metrics_url)
    await asyncio.sleep(max(0.0, end - time.perf_counter()))
    if cfg.metrics_url:
        after = await asyncio.to_thread(_scrape, cfg.metrics_url)
    await asyncio.gather(*tasks)  # in-flight calls finish (uncounted) so the next level starts clean

    ms = np.asarray(latencies) * 1e3
    p50, p90, p99 = (np.percentile(ms, [50, 90, 99]).tolist() if ms.size else [math.nan] * 3)
    split = (server_split(before, after, rpc=RPCS[cfg.rpc], model=cfg.model)
             if before is not None and after is not None else (None, None, None))
    return LevelResult(concurrency=n, duration_s=cfg.duration, ok=len(latencies), errors=dict(errors),
                       throughput=len(latencies) / cfg.duration, p50_ms=p50, p90_ms=p90, p99_ms=p99,
                       mean_ms=float(ms.mean()) if ms.size else math.nan, queue_wait_ms=split[0],
                       compute_ms_per_batch=split[1], mean_batch_size=split[2])


async def run_loadtest_async(cfg: LoadTestConfig,
                             on_level: Callable[[LevelResult], None] | None = None) -> list[LevelResult]:
    """Run the sweep; `on_level` sees each level's result as soon as it is done."""
    if cfg.rpc not in RPCS:
        raise ValueError(f"unknown rpc {cfg.rpc!r}; choose one of {', '.join(RPCS)}")
    if (not cfg.concurrency or min(cfg.concurrency) < 1 or cfg.duration <= 0 or cfg.warmup < 0
            or cfg.channels < 1):
        raise ValueError("concurrency levels must be >= 1, duration > 0, warmup >= 0, channels >= 1")
    request = _request(cfg)  # built once: the sweep measures the server, not the client's encoding
    # Channels with equal arguments share one connection unless each has its own subchannel pool.
    options = [("grpc.use_local_subchannel_pool", 1)] if cfg.channels > 1 else []
    clients = [AsyncClient(cfg.target, tls=cfg.tls, token=cfg.token, timeout=cfg.timeout, options=options)
               for _ in range(cfg.channels)]
    rpc = RPCS[cfg.rpc]
    calls = [lambda c=c: c._unary(rpc, request) for c in clients]  # noqa: SLF001  (same package)
    results = []
    try:
        for n in cfg.concurrency:
            result = await _level(calls, cfg, n)
            results.append(result)
            if on_level is not None:
                on_level(result)
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    return results


def run_loadtest(cfg: LoadTestConfig,
                 on_level: Callable[[LevelResult], None] | None = None) -> list[LevelResult]:
    """Blocking form of run_loadtest_async (starts its own event loop)."""
    return asyncio.run(run_loadtest_async(cfg, on_level))


# ---------------------------------------------------------------- reporting

_COLUMNS = ["concurrency", "duration_s", "requests_ok", "errors", "throughput_rps", "p50_ms", "p90_ms",
            "p99_ms", "mean_ms", "queue_wait_ms", "compute_ms_per_batch", "mean_batch_size", "errors_by_code"]


def _row(r: LevelResult) -> list[Any]:
    return [r.concurrency, r.duration_s, r.ok, r.error_count, round(r.throughput, 3), round(r.p50_ms, 2),
            round(r.p90_ms, 2), round(r.p99_ms, 2), round(r.mean_ms, 2),
            *(None if v is None else round(v, 3) for v in (r.queue_wait_ms, r.compute_ms_per_batch,
                                                           r.mean_batch_size)),
            ";".join(f"{k}={v}" for k, v in sorted(r.errors.items()))]


def write_csv(results: Sequence[LevelResult], path: str | Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(_COLUMNS)
        w.writerows(["" if v is None else v for v in _row(r)] for r in results)


def format_table(results: Sequence[LevelResult], header: bool = True) -> str:
    def fmt(v: float | None, digits: int = 1) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"

    out = io.StringIO()
    if header:
        out.write(f"{'conc':>5} {'ok':>7} {'err':>5} {'req/s':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
                  f"{'queue ms':>9} {'batch ms':>9} {'batch':>6}  errors\n")
    for r in results:
        errs = ", ".join(f"{k} {v}" for k, v in sorted(r.errors.items()))
        out.write(f"{r.concurrency:>5} {r.ok:>7} {r.error_count:>5} {fmt(r.throughput, 2):>8} "
                  f"{fmt(r.p50_ms):>8} {fmt(r.p90_ms):>8} {fmt(r.p99_ms):>8} {fmt(r.queue_wait_ms):>9} "
                  f"{fmt(r.compute_ms_per_batch):>9} {fmt(r.mean_batch_size, 2):>6}  {errs}\n")
    return out.getvalue()
