"""Budget figures (issue #15) on the tiny-model server: how soon a lane is free after a heavy Saliency call's
deadline, and how much resident memory comes back after large optimisation jobs.

    python -m tools.reliability.budget                 # both, malloc_trim on (the default)
    CONVLENS_MALLOC_TRIM=0 python -m tools.reliability.budget --memory-only   # the same without the trim

Figures, not assertions: the suite checks behaviour (tests/scheduler/test_compute_stop.py).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np

from convlens.v1 import convlens_pb2 as pb
from convlens.v1 import convlens_pb2_grpc as pb_grpc
from tools.common import load_average
from tools.reliability.tiny import EAGER, tiny_server


def rss_mb(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", text)
    return int(match.group(1)) / 1024 if match else float("nan")


class Peak:
    """Samples a process's RSS every 50 ms on a thread; `.peak` in MB."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb(self.pid))
            self._stop.wait(0.05)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


def metric(url: str, name: str) -> float:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def image(side: int = 32) -> pb.Image:
    data = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return pb.Image(tensor=pb.Tensor(dtype=pb.Dtype.Value("DTYPE_UINT8"), shape=[side, side, 3],
                                     data=data.tobytes()))


def deadline_stop(stub: pb_grpc.InspectionServiceStub, metrics_url: str, deadline: float) -> None:
    """A SmoothGrad-over-integrated-gradients call of 256 x 1024 rows with a short deadline, then a plain call."""
    smooth_ig = pb.SmoothGradOptions(samples=256, base_method=pb.SALIENCY_METHOD_INTEGRATED_GRADIENTS)
    heavy = pb.SaliencyRequest(model=EAGER, image=image(), method=pb.SALIENCY_METHOD_SMOOTHGRAD, smoothgrad=smooth_ig,
                               integrated_gradients=pb.IntegratedGradientsOptions(steps=1024),
                               outputs=[pb.SALIENCY_OUTPUT_HEATMAP])
    light = pb.SaliencyRequest(model=EAGER, image=image(), outputs=[pb.SALIENCY_OUTPUT_HEATMAP])
    stopped_before = metric(metrics_url, "convlens_compute_stopped_total")
    start = time.monotonic()
    try:
        stub.Saliency(heavy, timeout=deadline)
        code = "OK"
    except grpc.RpcError as err:
        code = err.code().name
    expired = time.monotonic()
    stub.Saliency(light, timeout=600)
    answered = time.monotonic()
    stopped = metric(metrics_url, "convlens_compute_stopped_total") - stopped_before
    print(f"heavy Saliency (262,144 rows), deadline {deadline:.1f}s: {code} after {expired - start:.2f}s; the next "
          f"call answered {answered - expired:.2f}s after that; tasks stopped: {stopped:g}", flush=True)


def memory_return(stub: pb_grpc.InspectionServiceStub, pid: int, metrics_url: str, size: int, jobs: int) -> None:
    """Large MaximizeUnit jobs one after another: RSS at baseline, peak, and once idle."""
    baseline = rss_mb(pid)
    peak = Peak(pid)
    for i in range(jobs):
        list(stub.MaximizeUnit(pb.MaximizeUnitRequest(model=EAGER, target=pb.Target(class_index=1), size=size,
                                                      steps=3, seed=i), timeout=600))
    time.sleep(1.0)  # a figure, not a test: let the last batch's trim happen
    after = rss_mb(pid)
    top = peak.stop()
    trimmed = metric(metrics_url, "convlens_memory_trimmed_bytes_total") / 2**20
    print(f"{jobs} MaximizeUnit jobs at size {size}: RSS {baseline:.0f} MB -> peak {top:.0f} MB -> after {after:.0f} "
          "MB "
          f"({(after - baseline) / baseline * 100:+.0f}% of baseline); malloc_trim gave back {trimmed:.0f} MB "
          f"(CONVLENS_MALLOC_TRIM={os.environ.get('CONVLENS_MALLOC_TRIM', '1')})", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.reliability.budget", description=__doc__.split("\n\n")[0])
    p.add_argument("--memory-only", action="store_true")
    p.add_argument("--size", type=int, default=1024, help="MaximizeUnit size (default 1024)")
    p.add_argument("--jobs", type=int, default=3)
    p.add_argument("--deadline", type=float, default=2.0)
    args = p.parse_args(argv)
    print(f"load average {load_average(count=1)}", flush=True)
    with tempfile.TemporaryDirectory() as tmp, tiny_server(Path(tmp)) as srv:
        with grpc.insecure_channel(srv.address) as channel:
            stub = pb_grpc.InspectionServiceStub(channel)
            stub.Saliency(pb.SaliencyRequest(model=EAGER, image=image()), timeout=120)  # warm
            if not args.memory_only:
                deadline_stop(stub, srv.metrics_url, args.deadline)
            memory_return(stub, srv.proc.pid, srv.metrics_url, args.size, args.jobs)
    print(f"load average {load_average(count=1)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
