"""Three replicas behind one SDK client (ipv4: target, round robin): each gets a share; stopping one with
SIGTERM in the middle of the load costs the client nothing."""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest

from convlens.client import Client, ConvLensError
from convlens.server.launcher import ServerProcess
from tests.operations.conftest import TINY, metric_value, scrape, serve_args

pytestmark = pytest.mark.slow  # real server processes


def saliency_ok(text: str) -> float:
    return metric_value(text, "grpc_server_handled_total", grpc_method="Saliency", grpc_code="OK")


def test_round_robin_spreads_load_and_a_draining_replica_loses_no_call(tiny_repo: Path, tmp_path: Path) -> None:
    with ExitStack() as stack:
        servers = [ServerProcess(serve_args(tiny_repo, "--grace", "20"), log_path=tmp_path / f"server{i}.log")
                   for i in range(3)]
        for s in servers:
            stack.callback(s.stop)
        with ThreadPoolExecutor(3) as pool:  # start side by side: most of a start is waiting for imports
            list(pool.map(ServerProcess.start, servers))
        target = "ipv4:" + ",".join(s.address for s in servers)
        image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        ok, failures = [0], []
        lock = threading.Lock()
        stop = threading.Event()

        def caller(client: Client) -> None:
            while not stop.is_set():
                try:
                    r = client.saliency(image, TINY, method="integrated_gradients", steps=16)
                    assert r.attribution.shape == (3, 64, 64)
                    with lock:
                        ok[0] += 1
                except ConvLensError as e:  # any failure at all fails the test
                    with lock:
                        failures.append(e)

        with Client(target, timeout=60) as client:
            threads = [threading.Thread(target=caller, args=(client,)) for _ in range(6)]
            for t in threads:
                t.start()
            try:
                deadline = time.monotonic() + 120
                while min(saliency_ok(scrape(s.metrics_url)) for s in servers) < 5:
                    assert time.monotonic() < deadline, "load never reached every replica"
                    time.sleep(0.1)
                victim = servers[1]
                before_victim = saliency_ok(scrape(victim.metrics_url))
                assert victim.proc is not None
                victim.proc.send_signal(signal.SIGTERM)
                assert victim.proc.wait(30) == 0
                stopped_at = ok[0]
                while ok[0] < stopped_at + 20:  # keep the load on the other two for a while
                    assert time.monotonic() < deadline + 60 and not failures, failures[:3]
                    time.sleep(0.05)
            finally:
                stop.set()
                for t in threads:
                    t.join(60)

        assert failures == [], failures[:3]
        shares = [saliency_ok(scrape(s.metrics_url)) for s in (servers[0], servers[2])] + [before_victim]
        assert all(share >= 5 for share in shares), shares
        assert sum(shares) <= ok[0]
        with Client(f"dns:///localhost:{servers[0].port}", timeout=30) as c:  # the other target form
            assert [m.name for m in c.list_models()] == [TINY]
