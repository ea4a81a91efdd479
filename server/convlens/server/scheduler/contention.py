"""Whether this machine's CPUs are contended right now: the worker's cue for where a lone task runs.

A lone task runs on the worker's device lane with every intra-op thread: on a quiet 2-core CPU that is the
fastest answer (a team of 2 OpenMP threads). But a team meets at a barrier after each of the hundreds of
parallel regions of a forward + backward, and when other processes (or our own loop and decode threads) want
the cores, one member is descheduled and the other waits for it, each time. Measured on the 2-core machine at
load average 6-7 (issue #15, docs/reliability.md): three concurrent EfficientNet-Lite0 Saliency calls, of which
the first ran alone on the device lane, took 5.5-8.1 s (the device lane was busy 13.3 s for a handful of lone
tasks) against 0.2-1.3 s with the lone task on a one-thread shard. That was the "first ~7 calls of each run take
2.2-4.5 s" of the issue: after a quiet moment a caller is alone, and alone means the device lane.

The signal is Linux's pressure stall information (/proc/pressure/cpu, "some avg10": the share of the last ~10 s
in which some runnable task waited for a CPU), else the 1-minute load average against the CPU count. Both are
read at most once per CACHE_SECONDS.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

PSI = Path("/proc/pressure/cpu")
PRESSURE_LIMIT = 10.0  # percent of time some task waited for a CPU (avg10) above which the CPUs are contended
CACHE_SECONDS = 0.5


def cpu_pressure(path: Path = PSI) -> float | None:
    """`some avg10` of /proc/pressure/cpu in percent; None where the kernel does not report it."""
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("some "):
            for field in line.split()[1:]:
                key, _, value = field.partition("=")
                if key == "avg10":
                    try:
                        return float(value)
                    except ValueError:
                        return None
    return None


class Contention:
    """`busy()`: whether the CPUs are contended (pressure over PRESSURE_LIMIT, or without pressure figures a
    1-minute load average of at least the CPU count), cached for CACHE_SECONDS."""

    def __init__(self, path: Path = PSI, limit: float = PRESSURE_LIMIT) -> None:
        self._path = path
        self._limit = limit
        self._checked = -1e9
        self._busy = False

    def busy(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if now - self._checked >= CACHE_SECONDS:
            self._checked = now
            pressure = cpu_pressure(self._path)
            if pressure is not None:
                self._busy = pressure > self._limit
            else:
                try:
                    self._busy = os.getloadavg()[0] >= (os.cpu_count() or 1)
                except OSError:
                    self._busy = False
        return self._busy
