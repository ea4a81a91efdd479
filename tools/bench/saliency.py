"""`make bench`: the service's Saliency throughput against the physical limit, batching on and off.

In one run on one machine: (a) raw in-process torch (EfficientNet-Lite0, 224 px, forward + backward to the
input) in every memory layout x batch size x threading; the best two are the candidates for the limit; (b) then,
round after round and at every concurrency level, back to back: raw torch at both candidates (the better is
the limit), the service with batching on, the same service with batching off (max batch size 1). Medians of
the per-round ratios are reported: this machine's speed drifts by tens of percent over minutes, so only
side-by-side measurements compare.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
from dataclasses import dataclass

import torch

from convlens.client.loadtest import LevelResult, LoadTestConfig, run_loadtest
from convlens.server.config import DEFAULT_POLICIES, parse_policy
from convlens.server.launcher import ServerProcess
from convlens.server.models.embedded import load_lite
from convlens.server.scheduler.policy import memory_format_for
from tools.bench.raw import LAYOUTS, RawPoint, in_layouts, measure, measure_one
from tools.common import MODEL, bench_parser, load_average, record, utc_now

ANSWER = LoadTestConfig.outputs  # what the load tester asks for: the heatmap and the predictions


def sweep(server: ServerProcess, levels: tuple[int, ...], seconds: float,
          outputs: tuple[str, ...] | None = ANSWER) -> list[LevelResult]:
    cfg = LoadTestConfig(target=server.address, rpc="saliency", model=MODEL, method="gradient",
                         concurrency=levels, duration=seconds, warmup=3.0, metrics_url=server.metrics_url,
                         timeout=300.0, outputs=outputs)
    results: list[LevelResult] = run_loadtest(cfg)
    return results


@dataclass(frozen=True)
class Round:
    index: int
    concurrency: int
    raw: float
    on: LevelResult
    off: LevelResult


def paired_rounds(models: dict[str, torch.nn.Module], best: list[RawPoint], on: ServerProcess,
                  off: ServerProcess, levels: tuple[int, ...], seconds: float, rounds: int, device: torch.device,
                  off_outputs: tuple[str, ...] | None = ANSWER) -> list[Round]:
    """Raw (the better of the best configurations, each measured again), batching on, batching off, back to
    back, at each level, several times. Measuring more than one raw candidate per round keeps one unlucky
    4 s point in the table from lowering the limit (two configurations are often within noise)."""
    out = []
    for i in range(rounds):
        for c in levels:
            raw = max(measure_one(models[p.layout], p.layout, p.batch_size, 224, seconds / 2, device, p.context,
                                  p.shards).images_per_second for p in best)
            a = sweep(on, (c,), seconds)[0]
            b = sweep(off, (c,), seconds, off_outputs)[0]
            out.append(Round(i + 1, c, raw, a, b))
            print(f"  round {i + 1}, concurrency {c:2d}: raw {raw:6.2f}/s, batching on {a.throughput:6.2f}/s "
                  f"(batch {a.mean_batch_size or 0:.2f}), {'off' if off_outputs else 'all outputs'} "
                  f"{b.throughput:6.2f}/s", flush=True)
    return out


def report(raw: list[RawPoint], top: list[RawPoint], rounds: list[Round], batch: str, device: str, seconds: float,
           load: tuple[str, str], served_layout: str, versus: str = "off") -> str:
    med = statistics.median
    levels = sorted({r.concurrency for r in rounds})
    by = {c: [r for r in rounds if r.concurrency == c] for c in levels}
    on_med = {c: med([r.on.throughput for r in by[c]]) for c in levels}
    best_c = max(levels, key=lambda c: on_med[c])
    batches = sorted({p.batch_size for p in raw})
    columns = list(dict.fromkeys((p.layout, p.context) for p in raw))
    table = {(p.layout, p.context, p.batch_size): p.images_per_second for p in raw}
    lines = [
        f"## {device} — {utc_now()}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "",
        f"Saliency (method=gradient, top-1 logit) on {MODEL} at 224 px; load tester and server on the same "
        f"machine; {seconds:.0f} s per level. Load average (1/5/15 min) at the start: {load[0]}; at the end: "
        f"{load[1]}. The server runs its replicas in **{served_layout}** on this device.",
        "",
        "**(a) Raw in-process torch, forward + backward to the input** (images/s; layout, calling thread; "
        "interleaved; `shards`: that many threads side by side, each with its share of the intra-op threads and "
        "its own model copy, each at the row's batch size, images/s summed):",
        "",
        "| batch | " + " | ".join(f"{lay}, {ctx}" for lay, ctx in columns) + " |",
        "| ---: | " + " | ".join("---:" for _ in columns) + " |",
        *(f"| {b} | " + " | ".join(f"{table[(lay, ctx, b)]:.2f}" for lay, ctx in columns) + " |" for b in batches),
        "",
        f"Best raw configurations in the table: **{top[0].label}** ({top[0].images_per_second:.2f} images/s) and "
        f"{top[1].label} ({top[1].images_per_second:.2f}); each paired round measures both again and takes the "
        "better as the limit.",
        "",
        f"**(b) Paired rounds** — raw at the better of the two best configurations, then the service with batching on "
        f"(`--batch {device}={batch}`) asking for {' + '.join(ANSWER or ())}, then "
        + ("off (`--batch {device}=1:0`)" if versus == "off" else
           "the same server asked for its default answer (the float attribution too; column `all`)")
        + ", back to back:",
        "",
        f"| round | concurrency | raw img/s | on req/s | {versus} req/s | on batch | on p50 ms | {versus} p50 ms "
        f"| on / raw | on / {versus} |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *(f"| {r.index} | {r.concurrency} | {r.raw:.2f} | {r.on.throughput:.2f} | {r.off.throughput:.2f} | "
          f"{r.on.mean_batch_size or 0:.2f} | {r.on.p50_ms:.0f} | {r.off.p50_ms:.0f} | "
          f"{r.on.throughput / r.raw:.2f} | {r.on.throughput / r.off.throughput:.2f} |" for r in rounds),
        "",
        f"| concurrency | median on / raw | median on / {versus} | median on req/s | median {versus} req/s |",
        "| ---: | ---: | ---: | ---: | ---: |",
        *(f"| {c}{' (best)' if c == best_c else ''} | {med([r.on.throughput / r.raw for r in by[c]]):.2f} | "
          f"{med([r.on.throughput / r.off.throughput for r in by[c]]):.2f} | {on_med[c]:.2f} | "
          f"{med([r.off.throughput for r in by[c]]):.2f} |" for c in levels),
        "",
        f"**Service / best raw at the best concurrency ({best_c}): "
        f"{med([r.on.throughput / r.raw for r in by[best_c]]):.2f}** (median of the paired rounds).",
        "",
    ]
    return "\n".join(lines)


MARKER = "<!-- make bench inserts its runs below this line, newest first -->"


def main() -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--seconds", type=float, default=12.0, help="per concurrency level and round")
    parser.add_argument("--concurrency", default="1,4,16,32")
    parser.add_argument("--raw-batches", default="1,2,4,8,16,32")
    parser.add_argument("--raw-seconds", type=float, default=4.0, help="per raw (layout, batch) point")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", default=None, help="batching policy SIZE:DELAY_MS (default: the server's)")
    parser.add_argument("--against", choices=["batching-off", "all-outputs"], default="batching-off",
                        help="the second service of each round: the same policy with batching off (default), or "
                             "the batching server asked for its default answer (what selectable outputs save)")
    args = parser.parse_args()
    device = torch.device(args.device)
    levels = tuple(int(c) for c in args.concurrency.split(","))
    default = DEFAULT_POLICIES["cuda" if device.type == "cuda" else "cpu"]
    batch = args.batch or f"{default.max_batch_size}:{default.max_batch_delay * 1000:g}:{default.shards}"
    shards = parse_policy(f"{args.device}={batch}")[1].shards
    load_start = load_average()

    print(f"(a) raw torch, forward + backward to the input (load {load_start})")
    models = in_layouts(load_lite(MODEL).module.to(device), list(LAYOUTS))
    raw = measure(models, 224, [int(b) for b in args.raw_batches.split(",")], args.raw_seconds, device,
                  shards=shards)
    for p in raw:
        print(f"  {p.label:>40}: {p.images_per_second:7.2f} images/s", flush=True)
    best = sorted(raw, key=lambda p: -p.images_per_second)[:2]
    print(f"best raw: {best[0].label}; the paired rounds measure it and {best[1].label} and take the better")
    common = ["--device", args.device, "--max-queue", "1024"]
    outputs_only = args.against == "all-outputs"
    with contextlib.ExitStack() as stack:
        on_srv = stack.enter_context(ServerProcess([*common, "--batch", f"{args.device}={batch}"]))
        off_srv = on_srv if outputs_only else stack.enter_context(
            ServerProcess([*common, "--batch", f"{args.device}=1:0"]))
        print(f"(b) paired rounds: raw, service with batching on ({batch}), "
              + ("the same asked for every output" if outputs_only else "off (1:0)"))
        rounds = paired_rounds(models, best, on_srv, off_srv, levels, args.seconds, args.rounds, device,
                               None if outputs_only else ANSWER)
    served = "channels_last" if memory_format_for(device) == torch.channels_last else "contiguous"
    text = report(raw, best, rounds, batch, args.device, args.seconds, (load_start, load_average()), served,
                  "all" if outputs_only else "off")
    print(text)
    record(args.out, text, MARKER)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
