"""`make bench` (part): 8 concurrent Dreams and 8 concurrent StyleTransfers vs the same 8 one after another.

One server process (EfficientNet-Lite0), the SDK's AsyncClient. In each round, for each RPC: the 8 jobs one
after another (each alone: every step a batch of one), then the same 8 at once (the step scheduler batches
their steps). The wall-time ratio concurrent / sequential is reported per round and as the median over
rounds: the machine's speed drifts, so only side-by-side measurements compare. Goal on 2 CPU cores <= 0.8;
on a GPU <= 0.3.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import numpy as np
import torch

from convlens.client import AsyncClient
from convlens.server.config import parse_policy
from convlens.server.launcher import ServerProcess
from tools.common import MODEL, bench_parser, load_average, photo, record, table, utc_now

MARKER = "<!-- bench_dream_style: runs are inserted below this line -->"


def photos(n: int, side: int) -> list[np.ndarray]:
    """n distinct embedded photos (cycled, flipped), cut to side x side."""
    base = [photo(name, side) for name in ("chelsea", "coffee", "astronaut", "rocket")]
    return [np.ascontiguousarray(base[i % len(base)][:, ::-1] if i >= len(base) else base[i % len(base)])
            for i in range(n)]


async def one_rpc(client: AsyncClient, rpc: str, i: int, images: list[np.ndarray], args: argparse.Namespace) -> Any:
    if rpc == "Dream":
        return await client.dream(images[i], MODEL, octaves=args.octaves, steps_per_octave=args.dream_steps,
                                  max_size=args.size, seed=i)
    return await client.style_transfer(images[i], images[(i + 1) % len(images)], MODEL, steps=args.style_steps,
                                       size=args.size, seed=i)


async def rounds(address: str, args: argparse.Namespace) -> dict[str, list[tuple[float, float]]]:
    images = photos(args.jobs, args.size)
    out: dict[str, list[tuple[float, float]]] = {"Dream": [], "StyleTransfer": []}
    async with AsyncClient(address, timeout=3600) as client:
        for rpc in out:  # warm-up: first calls pay for lazy initialisation
            await one_rpc(client, rpc, 0, images, args)
        for r in range(args.rounds):
            for rpc in out:
                start = time.perf_counter()
                for i in range(args.jobs):
                    await one_rpc(client, rpc, i, images, args)
                sequential = time.perf_counter() - start
                start = time.perf_counter()
                await asyncio.gather(*(one_rpc(client, rpc, i, images, args) for i in range(args.jobs)))
                concurrent = time.perf_counter() - start
                out[rpc].append((sequential, concurrent))
                print(f"  round {r + 1} {rpc:13s}: one after another {sequential:6.1f} s, {args.jobs} at once "
                      f"{concurrent:6.1f} s, ratio {concurrent / sequential:.2f}", flush=True)
    return out


def report(results: dict[str, list[tuple[float, float]]], args: argparse.Namespace, batch: str) -> str:
    when = f"{utc_now()}, load average {load_average()}"
    lines = [f"### Dream and StyleTransfer: {args.jobs} at once vs one after another ({when})", "",
             f"Device {args.device} ({torch.get_num_threads()} torch threads here), server batching policy "
             f"{batch}; images {args.size} px; Dream {args.octaves} octaves x {args.dream_steps} steps, "
             f"StyleTransfer {args.style_steps} Adam steps; {args.rounds} paired rounds "
             "(`python -m tools.bench.dream_style`).", ""]
    rows = []
    for rpc, pairs in results.items():
        ratios = [c / s for s, c in pairs]
        rows.append((rpc, f"{statistics.median(s for s, _ in pairs):.1f}",
                     f"{statistics.median(c for _, c in pairs):.1f}", ", ".join(f"{r:.2f}" for r in ratios),
                     f"**{statistics.median(ratios):.2f}**"))
    lines += table(["RPC", "one after another (s, median)", "at once (s, median)", "wall ratio per round",
                    "median ratio"], rows)
    return "\n".join(lines) + "\n"


def main() -> int:
    p = bench_parser(__doc__)
    p.add_argument("--jobs", type=int, default=8)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--octaves", type=int, default=2)
    p.add_argument("--dream-steps", type=int, default=10)
    p.add_argument("--style-steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", default="8:2", help="the server's step batch policy SIZE:DELAY_MS")
    args = p.parse_args()
    flags = ["--device", args.device, "--batch", f"{args.device}={args.batch}", "--max-jobs", str(2 * args.jobs)]
    with ServerProcess(flags) as server:
        results = asyncio.run(rounds(server.address, args))
    shards = parse_policy(f"{args.device}={args.batch}")[1].shards
    text = report(results, args, f"{args.batch} ({shards} shard(s))")
    print(text)
    record(args.out, text, MARKER, "Dream and StyleTransfer: step batching across callers")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
