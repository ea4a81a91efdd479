"""Server configuration: built once from flags and CONVLENS_* environment variables, then passed in."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from convlens.server.scheduler.policy import BatchPolicy

# Defaults per device kind. CPU: measured with `make bench` on 2 cores (docs/performance.md) — batching
# gains little there, so batches stay small and the delay short. GPU: larger batches pay off.
DEFAULT_POLICIES = {"cpu": BatchPolicy(4, 0.002), "cuda": BatchPolicy(32, 0.005)}


@dataclass(frozen=True)
class ServerConfig:
    host: str = "[::]"
    port: int = 50051
    metrics_port: int = 9464  # 0: any free port
    metrics: bool = True
    model_repo: Path | None = None
    embedded: bool = True
    device: str = "auto"
    max_message_mb: int = 64
    max_queue: int = 256
    grace_seconds: float = 10.0
    policies: dict[str, BatchPolicy] = field(default_factory=dict)  # per device string, overrides defaults
    log_level: str = "INFO"

    def policy_for(self, device: str) -> BatchPolicy:
        return self.policies.get(device) or DEFAULT_POLICIES["cuda" if device.startswith("cuda") else "cpu"]


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"CONVLENS_{name}", default)


def _policy(text: str) -> tuple[str, BatchPolicy]:
    """DEVICE=SIZE[:DELAY_MS], e.g. cpu=4:2 or cuda:0=32:5."""
    device, sep, rest = text.rpartition("=")
    if not sep or not device:
        raise argparse.ArgumentTypeError(f"expected DEVICE=SIZE[:DELAY_MS], got {text!r}")
    size, _, delay = rest.partition(":")
    try:
        return device, BatchPolicy(int(size), (float(delay) if delay else 2.0) / 1000)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected DEVICE=SIZE[:DELAY_MS] with size >= 1 and delay >= 0, "
                                         f"got {text!r} ({exc})") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convlens serve",
        description="Serve ConvLens over gRPC. Every flag also reads CONVLENS_<FLAG> (e.g. CONVLENS_PORT).")
    p.add_argument("--host", default=_env("HOST", "[::]"), help="bind address (default [::])")
    p.add_argument("--port", type=int, default=int(_env("PORT", "50051") or 50051), help="gRPC port (default 50051)")
    p.add_argument("--metrics-port", type=int, default=int(_env("METRICS_PORT", "9464") or 9464),
                   help="Prometheus metrics port (default 9464; 0 picks a free one)")
    p.add_argument("--no-metrics", action="store_true", default=_env("NO_METRICS", "") in ("1", "true"),
                   help="serve no metrics endpoint")
    p.add_argument("--model-repo", type=Path, default=_env("MODEL_REPO"),
                   help="folder with one sub-folder (model.toml + files) per model")
    p.add_argument("--no-embedded", action="store_true", default=_env("NO_EMBEDDED", "") in ("1", "true"),
                   help="do not serve the embedded EfficientNet-Lite models")
    p.add_argument("--device", default=_env("DEVICE", "auto"),
                   help="auto (every GPU, else the CPU), cpu, or a list such as cuda:0,cuda:1")
    p.add_argument("--max-message-mb", type=int, default=int(_env("MAX_MESSAGE_MB", "64") or 64))
    p.add_argument("--max-queue", type=int, default=int(_env("MAX_QUEUE", "256") or 256),
                   help="tasks waiting at most; beyond it calls get RESOURCE_EXHAUSTED (default 256)")
    p.add_argument("--batch", type=_policy, action="append", default=[],
                   metavar="DEVICE=SIZE[:DELAY_MS]",
                   help="batching policy per device, e.g. --batch cpu=4:2 --batch cuda:0=32:5 "
                        "(env CONVLENS_BATCH, comma separated)")
    p.add_argument("--grace", type=float, default=float(_env("GRACE", "10") or 10),
                   help="seconds in-flight calls get to finish on SIGTERM/SIGINT (default 10)")
    p.add_argument("--log-level", default=_env("LOG_LEVEL", "INFO"))
    return p


def from_args(argv: Sequence[str] | None = None) -> ServerConfig:
    p = parser()
    args = p.parse_args(argv)
    policies = dict(_policy(t) for t in (_env("BATCH", "") or "").split(",") if t)
    policies.update(dict(args.batch))
    if not 1 <= args.max_message_mb <= 2047:
        p.error("--max-message-mb must be in 1..2047")
    if args.max_queue < 1:
        p.error("--max-queue must be >= 1")
    return ServerConfig(
        host=args.host, port=args.port, metrics_port=args.metrics_port, metrics=not args.no_metrics,
        model_repo=Path(args.model_repo) if args.model_repo else None, embedded=not args.no_embedded,
        device=args.device, max_message_mb=args.max_message_mb, max_queue=args.max_queue,
        grace_seconds=args.grace, policies=policies, log_level=args.log_level)
