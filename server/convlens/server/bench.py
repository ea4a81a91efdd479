"""`make bench`: the service's Saliency throughput against the physical limit, batching on and off.

In one run on one machine: (a) raw in-process torch (EfficientNet-Lite0, 224 px, forward + backward to the
input) at its best batch size; (b) the service through the SDK's load tester at several concurrency levels;
(c) the same service with batching off (max batch size 1). Prints the ratios and writes a markdown report.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from convlens.client.loadtest import LevelResult, LoadTestConfig, format_table, run_loadtest
from convlens.server.bench_raw import RawPoint, measure
from convlens.server.config import DEFAULT_POLICIES
from convlens.server.launcher import ServerProcess
from convlens.server.models.embedded import load_lite

MODEL = "efficientnet_lite0"


def sweep(server: ServerProcess, levels: tuple[int, ...], seconds: float) -> list[LevelResult]:
    cfg = LoadTestConfig(target=server.address, rpc="saliency", model=MODEL, method="gradient",
                         concurrency=levels, duration=seconds, warmup=3.0, metrics_url=server.metrics_url,
                         timeout=300.0)
    return run_loadtest(cfg, on_level=lambda r: print(format_table([r], header=False), end="", flush=True))


@dataclass(frozen=True)
class Round:
    concurrency: int
    raw: float
    on: float
    off: float


def paired_rounds(model: torch.nn.Module, batch: int, on: ServerProcess, off: ServerProcess,
                  levels: tuple[int, ...], seconds: float, rounds: int, device: torch.device) -> list[Round]:
    """Raw, batching on, batching off, back to back, several times: this machine's speed drifts by tens of
    percent over minutes, so only measurements taken side by side make honest ratios."""
    out = []
    for i in range(rounds):
        for c in levels:
            raw = measure(model, 224, (batch,), seconds / 2, device)[0].images_per_second
            a = sweep(on, (c,), seconds)[0].throughput
            b = sweep(off, (c,), seconds)[0].throughput
            out.append(Round(c, raw, a, b))
            print(f"  round {i + 1}, concurrency {c}: raw {raw:.2f}/s, batching on {a:.2f}/s, off {b:.2f}/s")
    return out


def report(raw: list[RawPoint], on: list[LevelResult], off: list[LevelResult], rounds: list[Round],
           batch: str, device: str, seconds: float) -> str:
    best_raw = max(raw, key=lambda p: p.images_per_second)
    med = statistics.median
    by = {c: [r for r in rounds if r.concurrency == c] for c in sorted({r.concurrency for r in rounds})}
    lines = [
        f"## {device} — {dt.date.today().isoformat()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}",
        "",
        f"Saliency (method=gradient, top-1 logit) on {MODEL} at 224 px; load tester and server on the same "
        f"machine; {seconds:.0f} s per level.",
        "",
        "**(a) Raw in-process torch, forward + backward to the input:**",
        "",
        "| batch | images/s |",
        "| ---: | ---: |",
        *(f"| {p.batch_size} | {p.images_per_second:.2f} |" for p in raw),
        "",
        f"**(b) Service, batching on (`--batch {device}={batch}`):**",
        "",
        "```",
        format_table(on).rstrip(),
        "```",
        "",
        f"**(c) Service, batching off (`--batch {device}=1:0`):**",
        "",
        "```",
        format_table(off).rstrip(),
        "```",
        "",
        f"**Paired rounds** (raw at batch {best_raw.batch_size}, then the service with batching on, then off, "
        "back to back):",
        "",
        "| concurrency | raw img/s | on req/s | off req/s | on / raw | on / off |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
        *(f"| {r.concurrency} | {r.raw:.2f} | {r.on:.2f} | {r.off:.2f} | {r.on / r.raw:.2f} | "
          f"{r.on / r.off:.2f} |" for r in rounds),
        "",
        "| ratio (median of paired rounds) | value |",
        "| --- | ---: |",
        *(f"| concurrency {c}: service (batching on) / raw | {med([r.on / r.raw for r in by[c]]):.2f} |"
          for c in sorted(by)),
        *(f"| concurrency {c}: batching on / off | {med([r.on / r.off for r in by[c]]):.2f} |" for c in sorted(by)),
        *(f"| batching on / off at concurrency {a.concurrency} (sweeps) | {a.throughput / b.throughput:.2f} |"
          for a, b in zip(on, off, strict=True)),
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("docs/performance.md"))
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seconds", type=float, default=12.0, help="per concurrency level")
    parser.add_argument("--concurrency", default="1,4,16,32")
    parser.add_argument("--raw-batches", default="1,2,4,8,16,32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", default=None, help="batching policy SIZE:DELAY_MS (default: the server's)")
    args = parser.parse_args()
    device = torch.device(args.device)
    levels = tuple(int(c) for c in args.concurrency.split(","))
    default = DEFAULT_POLICIES["cuda" if device.type == "cuda" else "cpu"]
    batch = args.batch or f"{default.max_batch_size}:{default.max_batch_delay * 1000:g}"

    print("(a) raw torch, forward + backward to the input")
    model = load_lite(MODEL).module.to(device).eval()
    raw = measure(model, 224, tuple(int(b) for b in args.raw_batches.split(",")), args.seconds / 3, device)
    for p in raw:
        print(f"  batch {p.batch_size:3d}: {p.images_per_second:7.2f} images/s")
    best_batch = max(raw, key=lambda p: p.images_per_second).batch_size
    common = ["--device", args.device, "--max-queue", "1024"]
    with ServerProcess([*common, "--batch", f"{args.device}={batch}"]) as on_srv, \
            ServerProcess([*common, "--batch", f"{args.device}=1:0"]) as off_srv:
        print(f"(b) service, batching on ({batch})")
        on = sweep(on_srv, levels, args.seconds)
        print("(c) service, batching off (1:0)")
        off = sweep(off_srv, levels, args.seconds)
        best_c = max(on, key=lambda r: r.throughput).concurrency
        paired = tuple(sorted({1, best_c}))
        print(f"paired rounds at concurrency {paired}, raw batch {best_batch}")
        rounds = paired_rounds(model, best_batch, on_srv, off_srv, paired, args.seconds, args.rounds, device)
    text = report(raw, on, off, rounds, batch, args.device, args.seconds)
    print(text)
    header = "# Performance\n\nWritten by `make bench` (server/convlens/server/bench.py); newest run first.\n\n"
    previous = args.out.read_text().removeprefix(header) if args.out.exists() else ""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(header + text + "\n" + previous)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
