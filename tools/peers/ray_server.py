"""The Ray Serve peer: what a platform team reaches for. One node, a small object store, HTTP ingress.

A deployment whose Saliency handler uses `@serve.batch` (Ray's dynamic batching): requests are decoded
off the event loop, batched, and each batch runs one forward + backward on a compute thread with the
replica's share of the intra-op threads, in channels_last (tools/peers/work.py). MaximizeUnit runs a job
per request on a pool of single-threaded job threads, each with its own replica. Bodies are ConvLens's own
serialised request and response messages (`POST /saliency`, `POST /maximize`, application/x-protobuf).

A control port (stdlib HTTP) redeploys with other settings, so that the bench can sweep them without
restarting Ray: `POST /deploy?replicas=1&batch=8&wait=0.005`.

    python -m tools.peers.ray_server --port 51710 --control-port 51711 [--model MODEL]
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# A shared machine near its memory limit must not make Ray kill the replica (its memory monitor does at 95%).
os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import signal  # noqa: E402
import threading  # noqa: E402
import urllib.parse  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402
from typing import Any  # noqa: E402

import ray  # noqa: E402
import torch  # noqa: E402
from ray import serve  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import Response  # noqa: E402

from convlens.v1 import convlens_pb2 as pb  # noqa: E402
from tools.common import MODEL  # noqa: E402
from tools.peers import work  # noqa: E402

OBJECT_STORE_BYTES = 300 * 1024 * 1024
APP = "convlens-peer"


@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
class Peer:
    def __init__(self, model: str, threads: int, max_batch_size: int, batch_wait_timeout_s: float,
                 job_threads: int) -> None:
        torch.set_num_threads(1)  # no OpenMP team on the replica's own threads
        self.model = work.load(model)
        self.compute = ThreadPoolExecutor(1, thread_name_prefix="peer-batch",
                                          initializer=lambda: torch.set_num_threads(threads))
        self.local = threading.local()

        def job_init() -> None:
            torch.set_num_threads(1)
            self.local.model = self.model.replica(torch.device("cpu"), fresh=True)

        self.jobs = ThreadPoolExecutor(job_threads, thread_name_prefix="peer-job", initializer=job_init)
        self.saliency_batch.set_max_batch_size(max_batch_size)
        self.saliency_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def saliency_batch(self, inputs: list[torch.Tensor]) -> list[bytes]:
        def run() -> list[bytes]:
            return [r.SerializeToString() for r in work.saliency(self.model, inputs)]
        return await asyncio.get_running_loop().run_in_executor(self.compute, run)

    async def __call__(self, request: Request) -> Response:
        body = await request.body()
        loop = asyncio.get_running_loop()
        if request.url.path.rstrip("/").endswith("saliency"):
            message = pb.SaliencyRequest.FromString(body)
            image = await loop.run_in_executor(None, work.decode, message, self.model)
            out = await self.saliency_batch(image)
        elif request.url.path.rstrip("/").endswith("maximize"):
            job = pb.MaximizeUnitRequest.FromString(body)
            answer = await loop.run_in_executor(self.jobs, lambda: work.maximize(self.local.model, job))
            out = answer.SerializeToString()
        else:
            return Response(b"unknown route", status_code=404)
        return Response(out, media_type="application/x-protobuf")


def deploy(model: str, replicas: int, batch: int, wait: float) -> None:
    threads = max(1, (os.cpu_count() or 2) // replicas)
    app = Peer.options(num_replicas=replicas).bind(model, threads, batch, wait, max(1, 2 // replicas))
    serve.run(app, name=APP, route_prefix="/", blocking=False)


class Control(BaseHTTPRequestHandler):
    model = MODEL
    lock = threading.Lock()

    def do_POST(self) -> None:  # noqa: N802
        query = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
        try:
            with self.lock:
                deploy(self.model, int(query["replicas"][0]), int(query["batch"][0]), float(query["wait"][0]))
            self.send_response(200)
        except Exception as e:  # the bench reads the reason
            self.send_response(500)
            self.end_headers()
            self.wfile.write(repr(e).encode())
            return
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True, help="Ray Serve's HTTP ingress")
    parser.add_argument("--control-port", type=int, required=True)
    parser.add_argument("--model", default=MODEL, help="efficientnet_lite0 or a model folder")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--wait", type=float, default=0.005)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ray.init(num_cpus=os.cpu_count() or 2, object_store_memory=OBJECT_STORE_BYTES, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port}, logging_config={"log_level": "WARNING"})
        Control.model = args.model
        deploy(args.model, args.replicas, args.batch, args.wait)
        control = ThreadingHTTPServer(("127.0.0.1", args.control_port), Control)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        threading.Thread(target=control.serve_forever, daemon=True).start()
        print(f"READY {args.port}", flush=True)
        stop.wait()
        control.shutdown()
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
