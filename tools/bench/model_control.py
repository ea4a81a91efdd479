"""What a reload costs the callers: 8 callers call Saliency on a ResNet-18 folder while it is reloaded.

In one in-process server (explicit model control), interleaved rounds of two windows each: a steady window,
and a window that starts with a LoadModel of the same folder (a new copy swapped in while calls run). Reports
the LoadModel wall time, throughput and latency percentiles per kind of window (and their ratio), and the
failed calls (must be 0). `python -m tools.bench.model_control [--out docs/performance.md]`.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision

from convlens.client import AsyncClient
from convlens.server.app import ConvLensServer
from convlens.server.config import ServerConfig
from tools.common import bench_parser, load_average, record, table, utc_now

MARKER = "<!-- bench: model control (tools/bench/model_control.py) -->"
CALLERS = 8


def write_resnet(folder: Path) -> None:
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None, num_classes=10).state_dict(), folder / "weights.pt")
    (folder / "model.toml").write_text('format = "torchvision"\narch = "resnet18"\nweights = "weights.pt"\n'
                                       "num_classes = 10\n[preprocess]\nsize = 112\nresize = 112\n")


async def window(c: AsyncClient, seconds: float, reload: bool) -> tuple[list[float], int, float, float | None]:
    """(latencies, errors, wall seconds, LoadModel ms or None) of one window of CALLERS callers."""
    pixels = np.random.default_rng(0).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    latencies: list[float] = []
    errors = [0]
    end = time.monotonic() + seconds

    async def caller() -> None:
        while time.monotonic() < end:
            t = time.perf_counter()
            try:
                await c.saliency(pixels, "r18", target=0, method="gradient", overlay=False)
                latencies.append(time.perf_counter() - t)
            except Exception:  # noqa: BLE001 - counted: the bench reports every failed call
                errors[0] += 1

    start = time.monotonic()
    callers = [asyncio.create_task(caller()) for _ in range(CALLERS)]
    load_ms = None
    if reload:
        t = time.perf_counter()
        await c.load_model("r18")
        load_ms = (time.perf_counter() - t) * 1e3
    await asyncio.gather(*callers)
    return latencies, errors[0], time.monotonic() - start, load_ms


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1e3 if values else float("nan")


async def main_async(rounds: int, seconds: float, device: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "repo"
        write_resnet(root / "r18")
        srv = ConvLensServer(ServerConfig(host="127.0.0.1", port=0, metrics=False, embedded=False, device=device,
                                          grace_seconds=0.0, model_repo=root, model_control="explicit"))
        await srv.start()
        try:
            async with AsyncClient(f"127.0.0.1:{srv.port}", timeout=120) as c:
                await window(c, 2.0, reload=False)  # warm-up: replicas made, first batches run
                kinds: dict[bool, list[tuple[list[float], int, float, float | None]]] = {False: [], True: []}
                for _ in range(rounds):
                    for reload in (False, True):
                        kinds[reload].append(await window(c, seconds, reload))
        finally:
            await srv.stop(0.0)
    rows: list[tuple[object, ...]] = []
    rate = {}
    for reload, runs in kinds.items():
        lat = [x for r in runs for x in r[0]]
        rate[reload] = sum(len(r[0]) for r in runs) / sum(r[2] for r in runs)
        loads = [r[3] for r in runs if r[3] is not None]
        load_cell = f"{statistics.median(loads):.0f}" if loads else "-"
        rows.append(("with a reload" if reload else "steady", len(lat), sum(r[1] for r in runs),
                     f"{rate[reload]:.1f}", f"{pct(lat, 50):.0f}", f"{pct(lat, 99):.0f}", f"{pct(lat, 100):.0f}",
                     load_cell))
    return "\n".join([
        f"### Model control: a reload under {CALLERS} callers ({utc_now()}, {device}, load average "
        f"{load_average(sep=' ')})",
        "",
        f"ResNet-18 (torchvision folder, 112 px, Saliency gradient), {rounds} interleaved rounds of a {seconds:g} s "
        "steady window and a window that starts with `LoadModel` of the same folder (a new copy swapped in while "
        "the callers run).",
        "",
        *table(["window", "calls", "failed", "calls/s", "p50 ms", "p99 ms", "max ms", "LoadModel ms"], rows),
        "",
        f"Throughput in reload windows / steady: **{rate[True] / rate[False]:.2f}**.",
    ])


def main() -> None:
    p = bench_parser(__doc__)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=6.0)
    args = p.parse_args()
    torch.set_num_threads(1)  # as `convlens serve` does: only the workers run OpenMP teams
    text = asyncio.run(main_async(args.rounds, args.seconds, args.device))
    print(text)
    record(args.out, text, MARKER, section="Model control")


if __name__ == "__main__":
    main()
