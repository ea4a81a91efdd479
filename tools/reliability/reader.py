"""A caller that starts an optimisation stream, reads a few events and then stops reading (#15): the slow
and vanished readers of tests/reliability/test_streams.py and tools/reliability/storm.py run it as a
subprocess, then kill it (the connection drops with no goodbye) or leave it hanging.

    python -m tools.reliability.reader ADDRESS MODEL --read 2 [--size 32 --steps 4096]

It prints `read N` once it has read N progress events, then sleeps without reading until it is killed.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import grpc

from convlens.v1 import convlens_pb2 as pb
from convlens.v1 import convlens_pb2_grpc as pb_grpc


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.reliability.reader", description=__doc__.split("\n\n")[0])
    p.add_argument("address")
    p.add_argument("model")
    p.add_argument("--read", type=int, default=2, help="progress events to read before it stops reading")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--steps", type=int, default=4096)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    channel = grpc.insecure_channel(args.address)
    stub = pb_grpc.InspectionServiceStub(channel)
    request = pb.MaximizeUnitRequest(model=args.model, target=pb.Target(class_index=0), steps=args.steps,
                                     size=args.size, seed=args.seed, preview_every=1)
    responses = stub.MaximizeUnit(request)
    for n, _ in enumerate(responses, start=1):
        if n >= args.read:
            break
    print(f"read {args.read}", flush=True)
    while True:  # holds the call open without reading: grpc's flow control stops the server's writes
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
