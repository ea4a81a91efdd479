"""The ConvLens server: wires repository, scheduler, servicer, health, reflection and metrics together."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from prometheus_client import start_http_server

from convlens.server.config import ServerConfig, from_args
from convlens.server.metrics import Metrics
from convlens.server.models.repository import ModelRepository
from convlens.server.scheduler.devices import parse_devices
from convlens.server.scheduler.scheduler import Scheduler
from convlens.server.service import ServiceContext, Services
from convlens.server.service.model_control import ModelControl
from convlens.server.transport import access_log
from convlens.server.transport.auth import TokenAuth
from convlens.server.transport.connections import keepalive_options, server_credentials
from convlens.server.transport.drain import Drain
from convlens.server.transport.http.registry import RecordingServer
from convlens.server.transport.interceptor import ServiceInterceptor
from convlens.server.transport.reflection import enable_reflection
from convlens.server.transport.repository_servicer import ModelRepositoryServicer
from convlens.server.transport.servicer import InspectionServicer
from convlens.v1 import convlens_pb2 as pb
from convlens.v1 import convlens_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from convlens.server.transport.http.server import HttpFront

log = logging.getLogger("convlens.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["InspectionService"].full_name
REPOSITORY_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ModelRepositoryService"].full_name


class ConvLensServer:
    """One server process. `await start()`, then `await stop()`; tests use port 0 and read `.port`."""

    def __init__(self, config: ServerConfig, repository: ModelRepository | None = None) -> None:
        self.config = config
        self.repository = repository
        self.metrics = Metrics()
        self.health = health_aio.HealthServicer()
        self.port = 0
        self.metrics_port = 0
        self._server: grpc.aio.Server | None = None
        self._scheduler: Scheduler | None = None
        self._metrics_http = None
        self.drain = Drain()
        self.http_port = 0
        self._http: HttpFront | None = None
        self.model_control: ModelControl | None = None

    async def start(self) -> int:
        cfg = self.config
        devices = parse_devices(cfg.device)
        state: dict[str, object] = {"metrics": self.metrics}
        if self.repository is None:
            if cfg.model_repo is not None and cfg.model_control == "poll":
                # Before reading the folders: a change made while they are read is seen at the first poll.
                state["repository_seen"] = await asyncio.to_thread(ModelControl.disk_snapshot, Path(cfg.model_repo))
            self.repository = await asyncio.to_thread(
                ModelRepository.load, cfg.model_repo, include_embedded=cfg.embedded)
        repo = self.repository
        for name, reason in repo.failures.items():
            log.error("model %r not served: %s", name, reason)
        if not repo.models() and cfg.model_control == "none":
            raise SystemExit("no model to serve: every model folder failed to load (see the errors above)")

        policies = {str(d): cfg.policy_for(str(d)) for d in devices}
        self._scheduler = Scheduler(repo.get, devices, self.metrics, policies=policies, max_queue=cfg.max_queue,
                                    max_jobs=cfg.max_jobs, threads=cfg.threads or None,
                                    lone_all_threads=cfg.lone_all_threads, fold_batchnorm=cfg.fold_batchnorm)
        await self._scheduler.start()
        if cfg.warm_up:  # before the port opens: the first callers get warm replicas (scheduler/worker.py)
            started = time.monotonic()
            await self._scheduler.warm(repo.models())
            log.info("replicas of %d models made and run once on every lane in %.1f s", len(repo.models()),
                     time.monotonic() - started)

        limit = cfg.max_message_mb * 1024 * 1024
        auth = None
        if cfg.auth_tokens_file is not None or cfg.auth_tokens:
            auth = TokenAuth(path=cfg.auth_tokens_file, env_tokens=cfg.auth_tokens, exempt=cfg.auth_exempt)
        interceptor = ServiceInterceptor(self.metrics, auth=auth, access_log=access_log.AccessLog(cfg.log_format),
                                         drain=self.drain)
        server = RecordingServer(grpc.aio.server(  # records what is added, for the HTTP front
            interceptors=[interceptor],
            options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
                     ("grpc.so_reuseport", 0), *keepalive_options(cfg.max_connection_age_s)]))
        services = Services.build(ServiceContext(repo, self._scheduler, cfg, state=state))
        self.model_control = services.model_control
        await self.model_control.start()
        pb_grpc.add_InspectionServiceServicer_to_server(InspectionServicer(services), server)
        pb_grpc.add_ModelRepositoryServiceServicer_to_server(ModelRepositoryServicer(services.model_control), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        enable_reflection(server, (SERVICE_NAME, REPOSITORY_SERVICE_NAME,
                                   health_pb2.DESCRIPTOR.services_by_name["Health"].full_name))
        address = f"{cfg.host}:{cfg.port}"
        self.port = (server.add_secure_port(address, server_credentials(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca))
                     if cfg.tls_cert is not None and cfg.tls_key is not None else server.add_insecure_port(address))
        if self.port == 0:
            raise SystemExit(f"cannot bind {cfg.host}:{cfg.port}")
        await server.start()
        self._server = server  # type: ignore[assignment]
        if cfg.http_port is not None:
            await self._start_http(server, auth, interceptor.access_log)
        if cfg.metrics:
            httpd, _ = start_http_server(cfg.metrics_port, addr=cfg.metrics_host, registry=self.metrics.registry)
            self._metrics_http, self.metrics_port = httpd, httpd.server_port
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s on %s:%d%s%s (devices %s; metrics on %s:%d; model control %s)",
                 ", ".join(repo.names()) or "no model yet", cfg.host,
                 self.port, " with TLS" if cfg.tls_cert else "", " and client certificates" if cfg.tls_client_ca
                 else "", ", ".join(map(str, devices)), cfg.metrics_host, self.metrics_port, cfg.model_control)
        if auth is not None:
            log.info("bearer tokens required (exempt: %s)", ", ".join(cfg.auth_exempt) or "nothing")
        return self.port

    async def _start_http(self, server: RecordingServer, auth: TokenAuth | None, log: access_log.AccessLog) -> None:
        """The same handlers over HTTP/JSON and KServe v1, in this loop (transport/http/)."""
        from convlens.server.transport.http.server import HttpFront, HttpSettings, build_app

        cfg = self.config
        assert self.repository is not None and cfg.http_port is not None
        interceptor = ServiceInterceptor(self.metrics, auth=auth, access_log=log, drain=self.drain, protocol="http")
        app = build_app(server.methods(), interceptor, self.repository.names, lambda: not self.drain.draining,
                        kserve_aliases(cfg.kserve_aliases, self.repository.names()))
        self._http = HttpFront(app, HttpSettings(
            host=cfg.http_host or cfg.host, port=cfg.http_port, tls_cert=cfg.tls_cert, tls_key=cfg.tls_key,
            tls_client_ca=cfg.tls_client_ca))
        self.http_port = await self._http.start()

    async def stop(self, grace: float | None = None) -> None:
        """Drain: health NOT_SERVING and new calls refused at once; calls in flight get `grace` seconds.

        A call that still reaches us answers UNAVAILABLE, which balancing clients retry on other replicas.
        Shortly before the grace ends, calls still running are cut: each answers UNAVAILABLE saying how far
        it got. Once every answer is written, health Watch streams end, the listener closes and connections
        get their GOAWAY (transport/drain.py says why in that order); then the scheduler stops.
        """
        grace = self.config.grace_seconds if grace is None else grace
        end = time.monotonic() + grace
        await self.health.enter_graceful_shutdown()
        if self.model_control is not None:
            await self.model_control.stop()  # no poll loads a model into a draining server
        if self._server is not None:
            await self.drain.shut_down(self._server, grace)
        if self._http is not None:
            await self._http.stop()
        if self._scheduler is not None:
            await self._scheduler.stop(max(end - time.monotonic(), 0.1))
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()

    async def wait_for_termination(self) -> None:
        assert self._server is not None
        await self._server.wait_for_termination()


def kserve_aliases(pairs: Sequence[tuple[str, str]], served: Sequence[str]) -> dict[str, str]:
    """KServe name -> served model; an empty model means: the same name if served, else the only or first."""
    out = {}
    for alias, model in pairs:
        if not model:
            model = alias if alias in served or not served else sorted(served)[0]
        if model not in served:  # with --model-control it may be loaded later; until then: NOT_FOUND
            log.warning("KServe model %r: %r is not served (yet); served: %s", alias, model,
                        ", ".join(served) or "nothing")
        out[alias] = model
        log.info("KServe model %r is explained by %r", alias, model)
    return out


async def serve(config: ServerConfig) -> None:
    server = ConvLensServer(config)
    await server.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    print(f"convlens: serving on port {server.port}, metrics on port {server.metrics_port}"
          + (f", HTTP on port {server.http_port}" if server.http_port else ""), flush=True)
    await stopping.wait()
    log.info("draining: health NOT_SERVING, new calls refused, %d in flight get %g s",
             server.drain.in_flight, config.grace_seconds)
    for sig in (signal.SIGTERM, signal.SIGINT):  # a second signal ends the calls still running now
        loop.add_signal_handler(sig, lambda: log.warning("second signal: cut %d calls", server.drain.cut()))
    await server.stop()
    log.info("drained; exiting")


def main(argv: Sequence[str] | None = None) -> int:
    return run(from_args(argv))


def run(config: ServerConfig) -> int:
    access_log.configure(config.log_format, config.log_level)
    # Only the workers run OpenMP teams (scheduler/shards.py: with more team threads than cores, every team
    # stops spinning and a lone call ran at 0.6x). So the process runs torch on one thread from here on —
    # model loading, image preparation, the event loop — and each worker pins its own count.
    config = replace(config, threads=config.threads or torch.get_num_threads())
    torch.set_num_threads(1)
    asyncio.run(serve(config))
    # Drained: every call answered, the scheduler and its threads stopped. What is left is the interpreter
    # tearing down torch and grpc, 1-2 s measured here, which a pod's termination grace would pay for
    # nothing: flush the logs and leave.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    raise SystemExit(main())
