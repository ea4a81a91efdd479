"""What the server's per-call machinery costs: ListModels against a health check, same server, same channel.

Both are tiny unary calls that never reach the scheduler, so the gap between their latencies is the cost
of the interceptor (metrics, access log, auth, drain bookkeeping) plus ListModels' own few microseconds.
Calls alternate in blocks, round after round, so machine drift hits both alike; the report is the ratio of
the medians (p50) within each round, and the median of those ratios.

    python -m tools.bench.overhead [--rounds 7] [--calls 300] [-- serve args...]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from convlens.server.launcher import ServerProcess
from convlens.v1 import convlens_pb2 as pb
from convlens.v1 import convlens_pb2_grpc as pb_grpc
from tools.common import table


def _time(call: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        call()
        out.append(time.perf_counter() - t)
    return out


def measure(address: str, rounds: int, calls: int) -> list[tuple[float, float]]:
    """(health p50, ListModels p50) in seconds, per round."""
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        stub = pb_grpc.InspectionServiceStub(channel)
        check = lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=10)  # noqa: E731
        models = lambda: stub.ListModels(pb.ListModelsRequest(), timeout=10)  # noqa: E731
        _time(check, 200), _time(models, 200)  # warm the channel and both code paths
        out = []
        for _ in range(rounds):
            h, m = [], []
            for _ in range(4):  # short alternating blocks inside a round
                h += _time(check, calls // 4)
                m += _time(models, calls // 4)
            out.append((statistics.median(h), statistics.median(m)))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=400, help="calls of each kind per round")
    p.add_argument("serve_args", nargs="*", help="arguments for `convlens serve` (after --)")
    args = p.parse_args(argv)
    with ServerProcess(["--device", "cpu", *args.serve_args]) as srv:
        rows = measure(srv.address, args.rounds, args.calls)
    cells = [(i, f"{h * 1e3:.3f}", f"{m * 1e3:.3f}", f"{m / h:.2f}") for i, (h, m) in enumerate(rows, 1)]
    print("\n".join(table(["round", "health p50 (ms)", "ListModels p50 (ms)", "ratio"], cells)))
    ratio = statistics.median(m / h for h, m in rows)
    print(f"median ratio ListModels/health p50: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
