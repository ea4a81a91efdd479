"""Connection settings as small objects: TLS, Timeout, and the channel they add up to."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

_USER_AGENT = "convlens-python"
_SERVICE = "convlens.v1.InspectionService"


@dataclass(frozen=True)
class Retry:
    """Retry policy for UNAVAILABLE (a replica draining, restarting or unreachable), as gRPC service config.

    gRPC retries only calls the server has not answered with any message yet, so a stream that already
    sent progress is never silently restarted. Every ConvLens RPC is a read: repeating one is safe.
    """

    max_attempts: int = 5
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    backoff_multiplier: float = 2.0

    def service_config(self, *, balanced: bool = False) -> str:
        """Balanced (several replicas): round robin over the replicas the gRPC health service calls SERVING,
        watched by the channel itself, so a draining replica stops getting calls the moment it says so."""
        config: dict[str, Any] = {}
        if balanced:
            config["loadBalancingConfig"] = [{"round_robin": {}}]
            config["healthCheckConfig"] = {"serviceName": _SERVICE}
        return json.dumps({**config, "methodConfig": [{
            "name": [{"service": _SERVICE}],
            "retryPolicy": {"maxAttempts": self.max_attempts, "initialBackoff": f"{self.initial_backoff}s",
                            "maxBackoff": f"{self.max_backoff}s", "backoffMultiplier": self.backoff_multiplier,
                            "retryableStatusCodes": ["UNAVAILABLE"]}}]})


# Keepalive: ping every 30 s while calls are active (a 10-minute optimisation stream notices a vanished
# server in 40 s, not at its deadline); the server accepts pings from 10 s on.
KEEPALIVE_OPTIONS: tuple[tuple[str, int], ...] = (("grpc.keepalive_time_ms", 30_000),
                                                  ("grpc.keepalive_timeout_ms", 10_000),
                                                  ("grpc.keepalive_permit_without_calls", 0))


@dataclass(frozen=True)
class TLS:
    """Server authentication, optionally with a client certificate (all PEM; no roots: the system's)."""

    root_certificates: bytes | None = None
    private_key: bytes | None = None
    certificate_chain: bytes | None = None
    server_name: str | None = None  # override the name checked against the certificate (test certificates)

    @classmethod
    def from_files(cls, root_certificates: str | os.PathLike[str] | None = None, *,
                   private_key: str | os.PathLike[str] | None = None,
                   certificate_chain: str | os.PathLike[str] | None = None,
                   server_name: str | None = None) -> TLS:
        def read(p: str | os.PathLike[str] | None) -> bytes | None:
            return Path(p).read_bytes() if p is not None else None
        return cls(read(root_certificates), read(private_key), read(certificate_chain), server_name)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)


@dataclass(frozen=True)
class Timeout:
    """Per-call deadlines in seconds (None: wait forever).

    Streaming calls run hundreds of optimisation steps, so they get their own, longer deadline; a plain
    float given to a client sets `unary` only.
    """

    unary: float | None = 30.0
    stream: float | None = 600.0


TLSArg = bool | str | os.PathLike[str] | TLS
TimeoutArg = float | Timeout | None


@dataclass(frozen=True)
class ChannelConfig:
    """Everything a client needs to open its channel and decorate its calls; built once per client."""

    target: str
    tls: TLS | None
    token: str | None
    timeout: Timeout
    max_message_mb: int
    options: tuple[tuple[str, Any], ...]

    @classmethod
    def build(cls, target: str, *, tls: TLSArg = False, token: str | None = None,
              timeout: TimeoutArg = 30.0, max_message_mb: int = 64,
              options: Sequence[tuple[str, Any]] = ()) -> ChannelConfig:
        if tls is True:
            tls_obj: TLS | None = TLS()
        elif tls is False:
            tls_obj = None
        elif isinstance(tls, TLS):
            tls_obj = tls
        else:
            tls_obj = TLS.from_files(tls)  # a path to root certificates
        if isinstance(timeout, Timeout):
            t = timeout
        elif timeout is None:
            t = Timeout(None, None)
        else:
            t = Timeout(unary=float(timeout))
        if max_message_mb <= 0:
            raise ValueError("max_message_mb must be positive")
        return cls(target, tls_obj, token, t, int(max_message_mb), tuple(options))

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        # Sent as plain call metadata rather than call credentials, which grpc refuses on insecure
        # channels: a token must also work against a local server without TLS.
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def channel_options(self) -> list[tuple[str, Any]]:
        size = self.max_message_mb * 1024 * 1024
        opts: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", size),
            ("grpc.max_receive_message_length", size),
            ("grpc.primary_user_agent", _USER_AGENT),
            ("grpc.enable_retries", 1),
            ("grpc.service_config", Retry().service_config(balanced=_is_multi_address(self.target))),
            *KEEPALIVE_OPTIONS,
        ]
        if _is_multi_address(self.target):
            # Several replicas (a comma list, or a DNS name such as a headless Kubernetes Service): spread
            # calls over all of them instead of pick_first's "all on one".
            opts.append(("grpc.lb_policy_name", "round_robin"))
        if self.tls is not None and self.tls.server_name:
            opts.append(("grpc.ssl_target_name_override", self.tls.server_name))
        given = {k for k, _ in self.options}
        return [o for o in opts if o[0] not in given] + list(self.options)

    def credentials(self) -> grpc.ChannelCredentials | None:
        return self.tls.credentials() if self.tls is not None else None


def _is_multi_address(target: str) -> bool:
    return "," in target or target.startswith(("dns:", "ipv4:", "ipv6:"))
