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
from pathlib import Path

import torch

from convlens.client.loadtest import LevelResult, LoadTestConfig, format_table, run_loadtest
from convlens.server.bench_raw import RawPoint, measure
from convlens.server.launcher import ServerProcess
from convlens.server.models.embedded import load_lite

MODEL = "efficientnet_lite0"


def service_sweep(batch: str, device: str, levels: tuple[int, ...], seconds: float) -> list[LevelResult]:
    with ServerProcess(["--device", device, "--batch", f"{device}={batch}", "--max-queue", "1024"]) as srv:
        cfg = LoadTestConfig(target=srv.address, rpc="saliency", model=MODEL, method="gradient",
                             concurrency=levels, duration=seconds, warmup=3.0, metrics_url=srv.metrics_url,
                             timeout=300.0)
        return run_loadtest(cfg, on_level=lambda r: print(format_table([r], header=False), end="", flush=True))


def report(raw: list[RawPoint], on: list[LevelResult], off: list[LevelResult], batch: str, device: str,
           seconds: float) -> str:
    best_raw = max(raw, key=lambda p: p.images_per_second)
    best_on = max(on, key=lambda r: r.throughput)
    best_off = max(off, key=lambda r: r.throughput)
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
        "| ratio | value |",
        "| --- | ---: |",
        f"| service (best concurrency {best_on.concurrency}) / raw (best batch {best_raw.batch_size}) | "
        f"{best_on.throughput / best_raw.images_per_second:.2f} |",
        f"| batching on / off, best of each | {best_on.throughput / best_off.throughput:.2f} |",
        *(f"| batching on / off at concurrency {a.concurrency} | {a.throughput / b.throughput:.2f} |"
          for a, b in zip(on, off, strict=True)),
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("docs/performance.md"))
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seconds", type=float, default=20.0, help="per concurrency level")
    parser.add_argument("--concurrency", default="1,4,16,32")
    parser.add_argument("--raw-batches", default="1,2,4,8,16,32")
    parser.add_argument("--batch", default=None, help="batching policy SIZE:DELAY_MS (default: the server's)")
    args = parser.parse_args()
    device = torch.device(args.device)
    levels = tuple(int(c) for c in args.concurrency.split(","))
    from convlens.server.config import DEFAULT_POLICIES

    default = DEFAULT_POLICIES["cuda" if device.type == "cuda" else "cpu"]
    batch = args.batch or f"{default.max_batch_size}:{default.max_batch_delay_ms:g}"

    print("(a) raw torch, forward + backward to the input")
    model = load_lite(MODEL).module.to(device).eval()
    raw = measure(model, 224, tuple(int(b) for b in args.raw_batches.split(",")), args.seconds / 2, device)
    for p in raw:
        print(f"  batch {p.batch_size:3d}: {p.images_per_second:7.2f} images/s")
    del model
    print(f"(b) service, batching on ({batch})")
    on = service_sweep(batch, args.device, levels, args.seconds)
    print("(c) service, batching off (1:0)")
    off = service_sweep("1:0", args.device, levels, args.seconds)
    text = report(raw, on, off, batch, args.device, args.seconds)
    print(text)
    header = "# Performance\n\nWritten by `make bench` (server/convlens/server/bench.py); newest run first.\n\n"
    previous = args.out.read_text().removeprefix(header) if args.out.exists() else ""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(header + text + "\n" + previous)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
