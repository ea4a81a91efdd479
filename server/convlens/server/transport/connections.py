"""How clients connect: TLS and mutual TLS (--tls-cert / --tls-key / --tls-client-ca), keepalive, connection age."""

from __future__ import annotations

from pathlib import Path

import grpc


def server_credentials(cert: Path, key: Path, client_ca: Path | None = None) -> grpc.ServerCredentials:
    """TLS; with `client_ca`, clients must present a certificate signed by it or the handshake fails."""
    try:
        pair = (key.read_bytes(), cert.read_bytes())
        roots = client_ca.read_bytes() if client_ca is not None else None
    except OSError as exc:
        raise SystemExit(f"cannot read TLS file: {exc}") from None
    return grpc.ssl_server_credentials([pair], root_certificates=roots, require_client_auth=roots is not None)


def keepalive_options(max_connection_age_s: float) -> list[tuple[str, int]]:
    """Accept client keepalive pings every 10 s or more (the SDK pings every 30 s on busy channels),
    ping idle clients ourselves to find dead peers, and optionally age connections out so clients spread
    onto replicas that appeared after they connected."""
    opts = [("grpc.keepalive_time_ms", 60_000), ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1)]
    if max_connection_age_s > 0:
        opts.append(("grpc.max_connection_age_ms", int(max_connection_age_s * 1000)))
    return opts
