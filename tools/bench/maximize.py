"""`make bench` for MaximizeUnit: iteration-level batching of callers' optimisations, measured.

In one run, paired rounds, back to back: (a) the same 8 jobs one after another through the server, then
all 8 at once (the step scheduler batches their steps): the wall-time ratio; (b) a raw in-process loop of
the very batched step the server runs (8 MaximizeJobs, `run_step` on a channels_last replica, no gRPC,
no scheduler): job-steps per second, against the server's job-steps per second with 8 at once. Medians of
per-round ratios are reported: this machine's speed drifts over minutes, so only side-by-side numbers
compare.

    python -m tools.bench.maximize --out docs/performance.md
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time
import urllib.request
from collections.abc import Sequence

import torch

from convlens.client import AsyncClient
from convlens.server.config import parse_policy
from convlens.server.engine.optimize.maximize import MaximizeJob, MaximizeSettings
from convlens.server.engine.optimize.objectives import ClassLogit
from convlens.server.engine.optimize.runner import run_step
from convlens.server.launcher import ServerProcess
from convlens.server.models.embedded import load_lite
from convlens.server.scheduler.policy import memory_format_for
from convlens.server.scheduler.shards import side_by_side, split, threads_per_shard
from tools.common import MODEL, bench_parser, load_average, record, table, utc_now

MARKER = "<!-- bench_maximize -->"
CLASSES = (130, 144, 351, 736, 302, 63, 436, 100, 1, 967)


def raw_steps_per_second(args: argparse.Namespace, device: torch.device, batch: int, shards: int = 1) -> float:
    """Job-steps per second of the server's batched step, run in process, the jobs in batches of `batch`
    (the mean step batch the server formed: on a CPU, batch size changes the speed per image a lot); the
    better of one thread with every intra-op thread and, on a CPU with `shards` > 1, the jobs split between
    that many threads with a share each, side by side, as the server's shards run them.

    Run on a thread of its own, as the server's worker runs it: on this oversubscribed 2-core machine the
    same torch step ran 15-30x slower on the main thread than on a second thread (measured 2026-11-29:
    12.2 s vs 0.33-0.89 s for a batch of 8 at 128 px), so a main-thread loop would flatter the service."""
    results = [_on_threads(args, device, batch, 1)]
    if device.type == "cpu" and shards > 1:
        results.append(_on_threads(args, device, batch, shards))
    return max(results)


def _on_threads(args: argparse.Namespace, device: torch.device, batch: int, threads: int) -> float:
    """The jobs split between `threads` threads, each with its share of the intra-op threads; total
    job-steps per second over the wall time of the slowest."""
    model = load_lite(MODEL)
    pre = model.preprocess
    jobs = [MaximizeJob(MaximizeSettings.resolve(args.preset, steps=args.steps, size=args.size, seed=i),
                        ClassLogit(CLASSES[i % len(CLASSES)]), mean=pre.mean, std=pre.std, device=device)
            for i in range(args.jobs)]
    parts = split(jobs, threads)
    barrier = threading.Barrier(len(parts))
    ends: list[float] = []
    starts: list[float] = []

    def run(part: Sequence[MaximizeJob]) -> None:
        replica = model.replica(device, memory_format=memory_format_for(device), fresh=True)
        groups = [part[i:i + batch] for i in range(0, len(part), batch)]
        for group in groups:  # warm-up
            run_step(replica.module, group)
        barrier.wait()
        starts.append(time.perf_counter())
        for _ in range(args.steps - 1):
            for group in groups:
                run_step(replica.module, group)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        ends.append(time.perf_counter())

    side_by_side([lambda p=part: run(p) for part in parts],
                 threads_per_shard(len(parts)) if len(parts) > 1 else None)
    return args.jobs * (args.steps - 1) / (max(ends) - min(starts))


async def one(client: AsyncClient, i: int, args: argparse.Namespace) -> None:
    await client.maximize_unit(MODEL, CLASSES[i % len(CLASSES)], preset=args.preset, steps=args.steps,
                               size=args.size, seed=i)


async def service_round(server: ServerProcess, args: argparse.Namespace
                        ) -> tuple[float, float, float, float]:
    """(one after another s, at once s, mean step batch and worker busy share of the at-once half: compute
    seconds over the wall time of the lanes that compute side by side, so at most 100%)."""
    async with AsyncClient(server.address, timeout=3600) as client:
        start = time.perf_counter()
        for i in range(args.jobs):
            await one(client, i, args)
        sequential = time.perf_counter() - start
        total0, count0, busy0 = mean_step_batch(server)
        start = time.perf_counter()
        await asyncio.gather(*(one(client, i, args) for i in range(args.jobs)))
        concurrent = time.perf_counter() - start
        total1, count1, busy1 = mean_step_batch(server)
        lanes = max(args.shards, 1)
        return (sequential, concurrent, (total1 - total0) / max(count1 - count0, 1),
                (busy1 - busy0) / (concurrent * lanes))


def mean_step_batch(server: ServerProcess) -> tuple[float, float, float]:
    """(sum, count) of the server's convlens_step_batch_size histogram for MaximizeUnit, and the seconds its
    worker spent computing MaximizeUnit batches (steps and final scoring)."""
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    values = {"convlens_step_batch_size_sum": 0.0, "convlens_step_batch_size_count": 0.0,
              "convlens_scheduler_compute_seconds_sum": 0.0}
    for line in text.splitlines():
        for name in values:
            if line.startswith(name + "{") and 'rpc="MaximizeUnit"' in line:
                values[name] += float(line.rsplit(" ", 1)[1])
    return tuple(values.values())  # type: ignore[return-value]


def report(rows: list[tuple[float, float, float]], args: argparse.Namespace, batches: list[float],
           busies: list[float]) -> str:
    when = f"{utc_now()}, load average {load_average()}"
    wall = [c / s for s, c, _ in rows]
    service = [args.jobs * args.steps / c for _, c, _ in rows]
    vs_raw = [sv / raw for sv, (_, _, raw) in zip(service, rows, strict=True)]
    lines = [
        f"### MaximizeUnit: {args.jobs} jobs at once vs one after another ({when})", "",
        f"Device {args.device} ({torch.get_num_threads()} torch threads here); preset {args.preset}, "
        f"{args.steps} steps at {args.size} px per job; server step batch policy {args.batch} "
        f"({args.shards} shard(s)); "
        f"{args.rounds} paired rounds (`python -m tools.bench.maximize`).", "",
        *table(["round", "one after another (s)", "at once (s)", "wall ratio", "mean step batch",
                "worker busy (at once, per lane)", "service job-steps/s", "raw loop job-steps/s", "service / raw"],
               [(r, f"{s:.1f}", f"{c:.1f}", f"{ratio:.2f}", f"{b:.1f}", f"{u:.0%}", f"{sv:.1f}", f"{raw:.1f}",
                 f"{vr:.2f}")
                for r, ((s, c, raw), ratio, sv, vr, b, u) in enumerate(
                    zip(rows, wall, service, vs_raw, batches, busies, strict=True), 1)])]
    lines += ["", f"Median wall ratio (at once / one after another): **{statistics.median(wall):.2f}** "
                  f"(goal on a CPU <= 0.8); median service / raw loop: **{statistics.median(vs_raw):.2f}** "
                  "(goal >= 0.85); median share of the at-once wall time a compute lane spent computing MaximizeUnit "
                  f"batches: **{statistics.median(busies):.0%}** (the rest is scheduling, gRPC and encoding). "
                  "The raw loop runs the same jobs in process, in batches of the server's mean step "
                  "batch of that round, right after it; the service's time also includes each job's admission, "
                  "final scoring forward, PNG encoding and the gRPC stream."]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = bench_parser(__doc__)
    p.add_argument("--jobs", type=int, default=8)
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--preset", default="lucid")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", default="8:2", help="the server's batch policy SIZE:DELAY_MS[:SHARDS]")
    args = p.parse_args()
    device = torch.device(args.device)
    args.shards = shards = parse_policy(f"{args.device}={args.batch}")[1].shards
    flags = ["--device", args.device, "--batch", f"{args.device}={args.batch}", "--max-jobs", str(2 * args.jobs)]
    rows: list[tuple[float, float, float]] = []
    batches: list[float] = []
    busies: list[float] = []
    with ServerProcess(flags) as server:
        asyncio.run(service_round(server, argparse.Namespace(**{**vars(args), "jobs": 1, "steps": 2})))
        for r in range(args.rounds):
            sequential, concurrent, batch, busy = asyncio.run(service_round(server, args))
            raw = raw_steps_per_second(args, device, max(1, round(batch)), shards)
            batches.append(batch)
            busies.append(busy)
            rows.append((sequential, concurrent, raw))
            print(f"  round {r + 1}: one after another {sequential:.1f} s, at once {concurrent:.1f} s "
                  f"(ratio {concurrent / sequential:.2f}, mean step batch {batch:.1f}, worker busy {busy:.0%}); "
                  f"service {args.jobs * args.steps / concurrent:.1f} "
                  f"job-steps/s, raw {raw:.1f}", flush=True)
    text = report(rows, args, batches, busies)
    print(text)
    record(args.out, text, MARKER, "MaximizeUnit: step batching across callers")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
