"""The first calls on a fresh connection (issue #15): each run opens a new channel and sends the same short,
sequential mix — cheap reads, refusals (NOT_FOUND, INVALID_ARGUMENT) and valid Saliency calls — and prints every
call's latency, so that calls slow only because they come first stand out.

    python -m tools.reliability.first_calls --address 127.0.0.1:50051 [--runs 3] [--model efficientnet_lite0]

The server is any running `convlens serve` (the issue's probe used the default Lite0 server). Start it, then
run this at once: the first run sees the server's own first calls, the later runs a warm server on a fresh
connection.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
from PIL import Image

from convlens.v1 import convlens_pb2 as pb
from convlens.v1 import convlens_pb2_grpc as pb_grpc
from tools.common import MODEL


def _png(size: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def mix(model: str, size: int) -> list[tuple[str, Callable[[pb_grpc.InspectionServiceStub, float], object]]]:
    image = pb.Image(encoded=_png(size, 0))
    return [
        ("ListModels", lambda s, t: s.ListModels(pb.ListModelsRequest(), timeout=t)),
        ("GetModel unknown", lambda s, t: s.GetModel(pb.GetModelRequest(model="nosuch"), timeout=t)),
        ("Saliency no image", lambda s, t: s.Saliency(pb.SaliencyRequest(model=model), timeout=t)),
        ("Saliency", lambda s, t: s.Saliency(pb.SaliencyRequest(model=model, image=image), timeout=t)),
        ("GetModel", lambda s, t: s.GetModel(pb.GetModelRequest(model=model), timeout=t)),
        ("Saliency bad layer", lambda s, t: s.Saliency(pb.SaliencyRequest(
            model=model, image=image, target=pb.Target(unit=pb.Unit(layer="nosuch", channel=0))), timeout=t)),
        ("Saliency", lambda s, t: s.Saliency(pb.SaliencyRequest(model=model, image=image), timeout=t)),
        ("ListDatasets", lambda s, t: s.ListDatasets(pb.ListDatasetsRequest(), timeout=t)),
        ("Saliency", lambda s, t: s.Saliency(pb.SaliencyRequest(model=model, image=image), timeout=t)),
        ("GetModel unknown", lambda s, t: s.GetModel(pb.GetModelRequest(model="nosuch"), timeout=t)),
    ]


def run(address: str, model: str, size: int, calls: int, timeout: float, concurrency: int = 1
        ) -> list[tuple[str, str, float]]:
    """One run on a new channel: (call, status, seconds) per call, in order; `concurrency` calls at a time
    (each from a thread of its own, all started together)."""
    plan = mix(model, size)

    def one(stub: pb_grpc.InspectionServiceStub, i: int) -> tuple[str, str, float]:
        name, call = plan[i % len(plan)]
        start = time.perf_counter()
        try:
            call(stub, timeout)
            code = "OK"
        except grpc.RpcError as err:
            code = err.code().name  # type: ignore[attr-defined]
        return name, code, time.perf_counter() - start

    out: list[tuple[str, str, float]] = []
    with grpc.insecure_channel(address) as channel, ThreadPoolExecutor(concurrency) as pool:
        stub = pb_grpc.InspectionServiceStub(channel)
        for wave in range(0, calls, concurrency):
            out += list(pool.map(lambda i: one(stub, i), range(wave, min(calls, wave + concurrency))))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.reliability.first_calls", description=__doc__.split("\n\n")[0])
    p.add_argument("--address", required=True)
    p.add_argument("--model", default=MODEL)
    p.add_argument("--size", type=int, default=224, help="the Saliency image's side")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--concurrency", type=int, default=1, help="calls sent at once (in waves)")
    args = p.parse_args(argv)
    for r in range(args.runs):
        started = time.perf_counter()
        results = run(args.address, args.model, args.size, args.calls, args.timeout, args.concurrency)
        wall = time.perf_counter() - started
        print(f"run {r + 1} (new channel), {wall:.2f} s:")
        for i, (name, code, seconds) in enumerate(results, 1):
            print(f"  {i:3d} {name:<20} {code:<18} {seconds * 1000:9.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
