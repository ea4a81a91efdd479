"""Soak (issue #15): mixed valid traffic over every RPC at ~70% of the server's measured capacity for a long
time; every call must succeed and the server's RSS and open file descriptors must stay flat.

    python -m tools.reliability.soak --minutes 30          # what `make soak` runs (small-model server)

It first measures capacity (4 closed-loop callers for 30 s), then offers 70% of it as an open loop, and prints
one line per sample (every 60 s): calls so far, errors, RSS, file descriptors, threads.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from tools.reliability.tiny import tiny_server
from tools.reliability.traffic import Tally, closed_loop, holdings, open_loop

CALIBRATE_S = 30.0


async def soak(address: str, pid: int, minutes: float, share: float, sample_s: float) -> int:
    calibration = await closed_loop(address, workers=4, seconds=CALIBRATE_S)
    capacity = sum(calibration.codes.values()) / CALIBRATE_S
    rate = capacity * share
    base = holdings(pid)
    print(f"capacity {capacity:.1f} calls/s (closed loop, 4 callers, errors {calibration.errors()}); offering "
          f"{rate:.1f}/s for {minutes} min; baseline RSS {base['rss_mb']:.0f} MB, {base['fds']:.0f} fds, "
          f"{base['threads']:.0f} threads", flush=True)
    tally = Tally()
    samples: list[dict[str, float]] = []
    start = time.monotonic()
    next_sample = start

    def sample() -> None:
        nonlocal next_sample
        now = time.monotonic()
        if now >= next_sample:
            next_sample = now + sample_s
            h = holdings(pid)
            samples.append(h)
            print(f"  t={now - start:6.0f}s calls {sum(tally.codes.values()):7d} errors {tally.errors():4d} "
                  f"RSS {h['rss_mb']:7.1f} MB fds {h['fds']:4.0f} threads {h['threads']:4.0f}", flush=True)

    await open_loop(address, rate, minutes * 60, timeout=30, tally=tally, every=sample)
    sample()
    end = holdings(pid)
    rss = [s["rss_mb"] for s in samples]
    warm = rss[len(rss) // 10:] or rss  # after the first tenth (replicas, allocator warm-up)
    print(f"\n{sum(tally.codes.values())} calls in {time.monotonic() - start:.0f}s, errors {tally.errors()}: "
          f"{dict(tally.codes)}")
    print(f"RSS after warm-up {min(warm):.0f}..{max(warm):.0f} MB (spread {(max(warm) - min(warm)) / min(warm):.1%}); "
          f"fds {base['fds']:.0f} -> {end['fds']:.0f}; threads {base['threads']:.0f} -> {end['threads']:.0f}")
    return 1 if tally.errors() else 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.reliability.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--share", type=float, default=0.7, help="offered load as a share of the measured capacity")
    p.add_argument("--sample", type=float, default=60.0, help="seconds between samples")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, tiny_server(Path(tmp)) as srv:
        assert srv.proc is not None
        return asyncio.run(soak(srv.address, srv.proc.pid, args.minutes, args.share, args.sample))


if __name__ == "__main__":
    sys.exit(main())
