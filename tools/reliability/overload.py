"""Overload (issue #15): offer 10x the server's Saliency capacity for 60 s with a 2 s deadline per call.

With deadline-aware admission the excess is refused at once (RESOURCE_EXHAUSTED), the admitted calls finish
within their deadline, and RSS, threads and open files come back to their baseline.

    python -m tools.reliability.overload [--factor 10 --seconds 60 --deadline 2]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import grpc

from tools.reliability.tiny import tiny_server
from tools.reliability.traffic import MIX, Tally, closed_loop, holdings, open_loop, send

SALIENCY = [(rpc, request) for rpc, request, _ in MIX if rpc == "Saliency"]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))] if values else float("nan")


_ACCESS = re.compile(r"/convlens\.v1\.InspectionService/Saliency (\w+) ([0-9.]+)ms")


def server_side(log: Path, skip: int) -> dict[str, list[float]]:
    """Seconds each Saliency call spent in the server's handler (its access log), by status, after the first
    `skip` bytes of the log: the server's share of the time a caller waited (the rest is the network, grpc's
    own queues and the caller's loop)."""
    out: dict[str, list[float]] = {}
    with open(log, "rb") as f:
        f.seek(skip)
        for line in f.read().decode(errors="replace").splitlines():
            m = _ACCESS.search(line)
            if m:
                out.setdefault(m.group(1), []).append(float(m.group(2)) / 1000)
    return out


async def overload(address: str, pid: int, factor: float, seconds: float, deadline: float,
                   log: Path | None = None) -> int:
    warm = await closed_loop(address, workers=1, seconds=5)  # replicas made, allocator warm
    assert warm.errors() == 0, warm.codes
    base = holdings(pid)
    calibration = Tally()
    t0 = time.monotonic()

    async def caller() -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            while time.monotonic() - t0 < 20:
                await send(channel, "Saliency", SALIENCY[0][1], 30, calibration)

    await asyncio.gather(*(caller() for _ in range(4)))
    capacity = sum(calibration.codes.values()) / 20
    rate = capacity * factor
    print(f"Saliency capacity {capacity:.1f} calls/s (4 closed-loop callers); offering {rate:.0f}/s for "
          f"{seconds:.0f}s with a {deadline}s deadline; baseline RSS {base['rss_mb']:.0f} MB, "
          f"{base['threads']:.0f} threads, {base['fds']:.0f} fds", flush=True)
    tally = Tally()
    peak = dict(base)
    log_start = log.stat().st_size if log is not None else 0

    lags: list[float] = []  # how late each call left the caller's loop against the open-loop schedule
    sent = [0]

    def watch() -> None:
        lags.append(time.monotonic() - (offered + sent[0] / rate))
        sent[0] += 1
        if int(time.monotonic() * 2) % 10 == 0:
            h = holdings(pid)
            for k in peak:
                peak[k] = max(peak[k], h[k])

    offered = time.monotonic()
    await open_loop(address, rate, seconds, deadline, tally, schedule=SALIENCY, every=watch)
    await asyncio.sleep(2.0)  # the server's last answers settle before the after-sample
    after = holdings(pid)
    codes = {code: n for (_, code), n in tally.codes.items()}
    refused = [s for _, c, s in tally.latencies if c == "RESOURCE_EXHAUSTED"]
    ok = [s for _, c, s in tally.latencies if c == "OK"]
    late = [s for _, c, s in tally.latencies if c == "DEADLINE_EXCEEDED"]
    print(f"answers: {codes}; calls sent late against the schedule by p50 {pct(lags, 0.5) * 1000:.1f} ms, "
          f"p99 {pct(lags, 0.99) * 1000:.1f} ms (the caller's own loop)")
    print(f"time to refusal: p50 {pct(refused, 0.5) * 1000:.1f} ms, p99 {pct(refused, 0.99) * 1000:.1f} ms "
          f"({len(refused)} refused)")
    if log is not None:
        handled = server_side(log, log_start)
        print("in the server's handler (access log): " + "; ".join(
            f"{code} p50 {pct(v, 0.5) * 1000:.1f} ms, p99 {pct(v, 0.99) * 1000:.1f} ms ({len(v)})"
            for code, v in sorted(handled.items())))
    print(f"admitted and answered: p50 {pct(ok, 0.5):.3f}s, p99 {pct(ok, 0.99):.3f}s (deadline {deadline}s; "
          f"{len(ok)} OK, {len(late)} DEADLINE_EXCEEDED)")
    print(f"RSS {base['rss_mb']:.0f} -> peak {peak['rss_mb']:.0f} -> after {after['rss_mb']:.0f} MB "
          f"({(after['rss_mb'] - base['rss_mb']) / base['rss_mb']:+.1%}); threads {base['threads']:.0f} -> "
          f"{after['threads']:.0f}; fds {base['fds']:.0f} -> {after['fds']:.0f}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.reliability.overload", description=__doc__.split("\n\n")[0])
    p.add_argument("--factor", type=float, default=10.0)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--deadline", type=float, default=2.0)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, tiny_server(Path(tmp)) as srv:
        assert srv.proc is not None
        return asyncio.run(overload(srv.address, srv.proc.pid, args.factor, args.seconds, args.deadline,
                                    srv.log_path))


if __name__ == "__main__":
    sys.exit(main())
