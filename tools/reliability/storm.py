"""Cancellation storm (#15): optimisation streams cancelled at random steps among companions.

N streams (MaximizeUnit, Dream and StyleTransfer in turn, previews every step) are each cancelled after a
seeded random number of progress events (0: at once), while one companion per RPC, with the same input size
and layers (so the step scheduler batches it with them), runs to the end. Printed: the answers, how long the
server took to have no job and no queued task left after the last cancel, RSS before and after, and each
companion's image against its image computed alone (same seed).

    python -m tools.reliability.storm [--streams 300 --rounds 2 --steps 24 --seed 15]

Then the readers: one that stops reading a stream with a preview every step (how many steps and bytes were sent
before its job paused, per preview size), and a client process killed mid-stream (time until its job is freed).

The suite's short version is tests/reliability/test_streams.py; the helpers below are shared with it.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import random
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from google.protobuf.message import Message
from PIL import Image

from convlens.v1 import convlens_pb2 as pb
from convlens.v1 import convlens_pb2_grpc as pb_grpc

RPCS = ("MaximizeUnit", "Dream", "StyleTransfer")


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


_RNG = np.random.default_rng(15)
DREAM_IMAGE = pb.Image(encoded=_png(_RNG.integers(0, 256, (48, 48, 3), dtype=np.uint8)))
CONTENT = pb.Image(encoded=_png(_RNG.integers(0, 256, (40, 40, 3), dtype=np.uint8)))
STYLE = pb.Image(encoded=_png(_RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)))


@dataclass(frozen=True)
class Streams:
    """The requests of a storm on one model: every job of an RPC has the same step key (input size, layers),
    so storm jobs and the companion share step batches; only the seed (and the class) differ."""

    model: str
    dream_layer: str
    steps: int = 12  # per job (Dream: two octaves of steps / 2)
    size: int = 32
    preview_every: int = 1

    def request(self, rpc: str, seed: int) -> Message:
        if rpc == "MaximizeUnit":
            return pb.MaximizeUnitRequest(model=self.model, target=pb.Target(class_index=seed % 5),
                                          steps=self.steps, size=self.size, seed=seed,
                                          preview_every=self.preview_every)
        if rpc == "Dream":
            return pb.DreamRequest(model=self.model, image=DREAM_IMAGE, layer=self.dream_layer, octaves=2,
                                   steps_per_octave=max(1, self.steps // 2), max_size=48, jitter=4, seed=seed,
                                   preview_every=self.preview_every)
        if rpc == "StyleTransfer":
            return pb.StyleTransferRequest(model=self.model, content=CONTENT, style=STYLE, steps=self.steps,
                                           size=40, seed=seed, style_weight=1e4, learning_rate=1.0,
                                           preview_every=self.preview_every)
        raise ValueError(f"not an optimisation RPC: {rpc}")


@dataclass
class Outcome:
    rpc: str
    steps: list[int] = field(default_factory=list)  # the progress events read, by step
    result: Message | None = None  # the result event, when the stream ran to its end
    code: grpc.StatusCode | None = None
    cancelled_by_us: bool = False
    details: str = ""  # the status message, when the call failed

    @property
    def image(self) -> np.ndarray:
        assert self.result is not None, f"{self.rpc}: no result ({self.code})"
        return np.asarray(Image.open(io.BytesIO(self.result.image_png)).convert("RGB"), dtype=np.int16)


async def stream(channel: grpc.aio.Channel, rpc: str, request: Message, *, cancel_after: int | None = None,
                 timeout: float = 300.0) -> Outcome:
    """Call `rpc` and read its stream; with `cancel_after`, cancel the call once that many progress events
    were read (0: right after starting it)."""
    call = getattr(pb_grpc.InspectionServiceStub(channel), rpc)(request, timeout=timeout)
    out = Outcome(rpc)
    if cancel_after == 0:
        call.cancel()
        out.cancelled_by_us, out.code = True, grpc.StatusCode.CANCELLED
        return out
    try:
        async for response in call:
            if response.WhichOneof("event") == "progress":
                out.steps.append(response.progress.step)
                if cancel_after is not None and len(out.steps) >= cancel_after:
                    call.cancel()
                    out.cancelled_by_us, out.code = True, grpc.StatusCode.CANCELLED
                    return out
            else:
                out.result = response.result
        out.code = await call.code()
    except grpc.aio.AioRpcError as error:
        out.code, out.details = error.code(), error.details() or ""
    return out


def plan(streams: int, seed: int, steps: int) -> list[tuple[str, int, int]]:
    """(rpc, job seed, progress events read before cancelling) of each storm stream; seeded."""
    rng = random.Random(seed)
    return [(RPCS[i % len(RPCS)], 1000 + i, rng.randint(0, steps - 1)) for i in range(streams)]


COMPANION_SEED = 7
# A companion's image among the storm vs alone, in 0..255 grey levels: batched (and sharded) convolutions round
# differently, and an optimisation carries that on. On the suite's tiny network at most 2 (as the streaming
# tests' batched-vs-alone checks); MaximizeUnit on the random-weight resnet18 amplifies it further: the same job
# alone differs by up to 41 levels between 1 and 2 intra-op threads (docs/reliability.md), so the tool reports it.
MAX_GREY_LEVELS = 2


async def alone(channel: grpc.aio.Channel, spec: Streams) -> dict[str, Outcome]:
    """Each companion's request run with nothing else on the server: the reference results."""
    return {rpc: await stream(channel, rpc, spec.request(rpc, COMPANION_SEED)) for rpc in RPCS}


async def storm(channel: grpc.aio.Channel, spec: Streams, streams: int, seed: int
                ) -> tuple[dict[str, Outcome], list[Outcome]]:
    """The companions (run to the end) and the storm (each stream cancelled as `plan` says), all at once."""
    companions = [stream(channel, rpc, spec.request(rpc, COMPANION_SEED)) for rpc in RPCS]
    cancelled = [stream(channel, rpc, spec.request(rpc, job_seed), cancel_after=after)
                 for rpc, job_seed, after in plan(streams, seed, spec.steps)]
    results = await asyncio.gather(*companions, *cancelled)
    return dict(zip(RPCS, results[:len(RPCS)], strict=True)), list(results[len(RPCS):])


def difference(a: Outcome, b: Outcome) -> tuple[int, float]:
    """Largest and mean absolute difference of two results' images, in 0..255 grey levels."""
    diff = np.abs(a.image - b.image)
    return int(diff.max()), float(diff.mean())


# ---- the long version, against its own small-model server process ----

def metric(metrics_url: str, name: str) -> float:
    """The sum of every sample of metric `name` (all labels) on the server's /metrics page."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    return sum(float(m.group(2)) for m in re.finditer(rf"^{name}(\{{[^}}]*\}})? (\S+)$", text, re.M))


async def until(metrics_url: str, done: Callable[[Callable[[str], float]], bool], within_s: float = 60.0) -> float:
    """Seconds until `done(read)` holds, `read(name)` reading the server's metrics; inf if it never does."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < within_s:
        if await asyncio.to_thread(done, lambda name: metric(metrics_url, name)):
            return time.monotonic() - t0
        await asyncio.sleep(0.005)
    return float("inf")


def _idle(read: Callable[[str], float]) -> bool:
    return read("convlens_active_jobs") == 0 and read("convlens_scheduler_queue_depth") == 0


async def storm_rounds(address: str, metrics_url: str, pid: int, spec: Streams, streams: int, seed: int,
                       rounds: int) -> int:
    from tools.reliability.traffic import holdings

    failures = 0
    async with grpc.aio.insecure_channel(address) as channel:
        reference = await alone(channel, spec)  # also warms the replicas and the allocator
        for rpc, out in reference.items():
            assert out.code == grpc.StatusCode.OK, f"{rpc} alone: {out.code}"
        base = holdings(pid)
        print(f"storm: {streams} cancelled streams + 3 companions per round, {spec.steps} steps each, previews "
              f"every step, seed {seed}; baseline RSS {base['rss_mb']:.0f} MB, {base['threads']:.0f} threads, "
              f"{base['fds']:.0f} fds", flush=True)
        for r in range(rounds):
            t0 = time.monotonic()
            companions, cancelled = await storm(channel, spec, streams, seed + r)
            ended = time.monotonic()
            idle = await until(metrics_url, _idle)
            codes = Counter(o.code.name if o.code else "?" for o in cancelled)
            refused = Counter(o.details[:70] for o in cancelled if not o.cancelled_by_us)
            read = sum(len(o.steps) for o in cancelled)
            diffs = {rpc: difference(companions[rpc], reference[rpc]) for rpc in RPCS}
            exact = sum(companions[rpc].result.image_png == reference[rpc].result.image_png  # type: ignore[union-attr]
                        for rpc in RPCS if companions[rpc].result is not None)
            h = holdings(pid)
            print(f"  round {r}: {ended - t0:.2f}s, storm answers {dict(codes)}, {read} progress events read; "
                  f"no job or queued task {idle * 1000:.0f} ms after the last stream ended; companions vs alone "
                  f"(max/mean grey levels) {', '.join(f'{k} {m}/{a:.3f}' for k, (m, a) in diffs.items())}, "
                  f"{exact}/3 byte-identical; RSS {h['rss_mb']:.0f} MB, threads {h['threads']:.0f}, "
                  f"fds {h['fds']:.0f}", flush=True)
            for details, n in refused.items():
                print(f"    {n} not cancelled by us: {details}", flush=True)
            beyond = [rpc for rpc, (m, _) in diffs.items() if m > MAX_GREY_LEVELS]
            if beyond:
                print(f"    beyond {MAX_GREY_LEVELS} grey levels (rounding carried on by the optimisation, see above): "
                      f"{', '.join(beyond)}", flush=True)
            failures += idle == float("inf")
            failures += sum(c.code != grpc.StatusCode.OK for c in companions.values())
        after = holdings(pid)
    print(f"  RSS {base['rss_mb']:.0f} -> {after['rss_mb']:.0f} MB "
          f"({(after['rss_mb'] - base['rss_mb']) / base['rss_mb']:+.1%}); threads {base['threads']:.0f} -> "
          f"{after['threads']:.0f}; fds {base['fds']:.0f} -> {after['fds']:.0f}", flush=True)
    return failures


async def slow_reader(address: str, metrics_url: str, model: str, size: int) -> int:
    """A reader that reads one event and stops: how many steps ran and how many bytes were sent before its job
    paused; then it reads again (every event there, in order) and cancels."""
    spec = Streams(model=model, dream_layer="", steps=4096, size=size)
    steps_before = metric(metrics_url, "convlens_optimization_steps_total")
    async with grpc.aio.insecure_channel(address) as channel:
        call = pb_grpc.InspectionServiceStub(channel).MaximizeUnit(spec.request("MaximizeUnit", 1), timeout=600)
        first = await call.read()
        paused = await until(metrics_url, lambda read: read("convlens_jobs_waiting_for_caller") == 1, 600.0)
        steps = metric(metrics_url, "convlens_optimization_steps_total") - steps_before
        sizes = [first.ByteSize()]
        while len(sizes) < steps:
            sizes.append((await call.read()).ByteSize())
        unpaused = await until(metrics_url, lambda read: read("convlens_jobs_waiting_for_caller") == 0)
        call.cancel()
        t0 = time.monotonic()
        freed = await until(metrics_url, _idle)
    print(f"  size {size:4d} px: paused after {steps:.0f} steps ({paused:.2f}s after the first event), "
          f"{sum(sizes) / 1024:.0f} KiB sent unread ({sum(sizes) / len(sizes) / 1024:.1f} KiB per event); "
          f"resumed once read ({unpaused * 1000:.0f} ms); cancelled: freed in {freed * 1000:.0f} ms "
          f"({time.monotonic() - t0:.2f}s)", flush=True)
    return int(paused == float("inf") or freed == float("inf"))


async def vanished_reader(address: str, metrics_url: str, model: str, size: int) -> int:
    """A client process that read two events and stopped reading (its job paused), then killed."""
    reader = subprocess.Popen([sys.executable, "-m", "tools.reliability.reader", address, model, "--read", "2",
                               "--size", str(size)], stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout is not None
        line = await asyncio.to_thread(reader.stdout.readline)
        assert line.strip() == "read 2", line
        paused = await until(metrics_url, lambda read: read("convlens_jobs_waiting_for_caller") == 1, 600.0)
        reader.kill()
        t0 = time.monotonic()
        freed = await until(metrics_url, lambda read: _idle(read) and read("convlens_jobs_waiting_for_caller") == 0)
        print(f"  killed while paused ({paused:.2f}s to pause): job freed {freed * 1000:.0f} ms after the kill "
              f"({time.monotonic() - t0:.2f}s)", flush=True)
    finally:
        if reader.poll() is None:
            reader.kill()
        reader.wait()
        if reader.stdout is not None:
            reader.stdout.close()
    return int(paused == float("inf") or freed == float("inf"))


async def run(address: str, metrics_url: str, pid: int, streams: int, steps: int, seed: int, rounds: int) -> int:
    from tools.reliability.tiny import EAGER

    spec = Streams(model=EAGER, dream_layer="layer2", steps=steps)
    failures = await storm_rounds(address, metrics_url, pid, spec, streams, seed, rounds)
    print("slow reader (MaximizeUnit, a preview every step, reads one event then stops):", flush=True)
    for size in (64, 128, 256):
        failures += await slow_reader(address, metrics_url, EAGER, size)
    print("vanished reader (a client process killed):", flush=True)
    failures += await vanished_reader(address, metrics_url, EAGER, 256)
    print(f"failures {failures}")
    return 1 if failures else 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.reliability.storm", description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=300, help="cancelled streams per round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--seed", type=int, default=15)
    p.add_argument("--address", help="a running tiny server (tools/reliability/tiny.py) instead of starting one; "
                   "with --metrics-url and --pid")
    p.add_argument("--metrics-url")
    p.add_argument("--pid", type=int)
    args = p.parse_args(argv)
    if args.address:
        return asyncio.run(run(args.address, args.metrics_url, args.pid, args.streams, args.steps, args.seed,
                               args.rounds))
    from tools.reliability.tiny import tiny_server

    with tempfile.TemporaryDirectory() as tmp, \
            tiny_server(Path(tmp), ["--max-jobs", str(args.streams + len(RPCS))]) as srv:
        assert srv.proc is not None
        return asyncio.run(run(srv.address, srv.metrics_url, srv.proc.pid, args.streams, args.steps, args.seed,
                               args.rounds))


if __name__ == "__main__":
    sys.exit(main())
