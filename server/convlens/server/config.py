"""Server configuration: built once from flags and CONVLENS_* environment variables, then passed in."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from convlens.server.scheduler.policy import BatchPolicy

# Defaults per device kind. CPU: measured on 2 cores (docs/performance.md). In channels_last with one batch on
# both cores, size 8 lost to size 4 at concurrency 16 (0.73x) and a 10 ms delay cost 0.88x alone
# (concurrency 1). Split between 2 single-threaded shards (scheduler/shards.py), Saliency at concurrency 16
# ran 26.0 req/s unsplit at size 4 against 32.4 split at size 8 (4 + 4); sizes 4 (2 + 2) and 8 were within
# noise of each other (31.7-32.5 vs 28.2-33.1) and 16 no better (29.9), so 8 with 2 shards and 2 ms: each
# shard takes up to 4 on its own (worker.py's lanes), which is raw torch's best batch per shard. GPU: larger
# batches pay off (not measured here: no GPU lent).
DEFAULT_CPU_SHARDS = min(2, torch.get_num_threads())
DEFAULT_POLICIES = {"cpu": BatchPolicy(8, 0.002, DEFAULT_CPU_SHARDS), "cuda": BatchPolicy(32, 0.005)}


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
    max_jobs: int = 64  # optimisation jobs (MaximizeUnit, Dream, StyleTransfer) running at once
    threads: int = 0  # intra-op threads of the CPU worker's compute; 0: torch's default (the physical cores)
    # A lone task on every intra-op thread of the CPU worker (its device lane) instead of one shard's share.
    # Off: a 2-thread OpenMP team spins at each of a forward + backward's barriers, and when the cores are
    # shared (other processes, a pod's CPU quota) a lone call collapsed from 13 to 0.7-1.2 requests/s
    # (docs/performance.md); on a dedicated quiet host it makes a lone call ~1.15x faster.
    lone_all_threads: bool = False
    # Batch norm folded into the convolutions for requests that read no layer (models/fold.py): ~20% less
    # compute on Lite0; gradients differ from the unfolded model's at rounding-flipped ReLU6 kinks.
    fold_batchnorm: bool = False
    grace_seconds: float = 10.0
    policies: dict[str, BatchPolicy] = field(default_factory=dict)  # per device string, overrides defaults
    log_level: str = "INFO"
    # Operations (deploy/, README "Running in production").
    metrics_host: str = "0.0.0.0"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # set: clients must present a certificate signed by it (mTLS)
    auth_tokens_file: Path | None = None
    auth_tokens: str | None = None  # CONVLENS_AUTH_TOKENS: "name:token,token2", beside or instead of the file
    auth_exempt: tuple[str, ...] = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                                    "/grpc.reflection.v1.ServerReflection/")
    log_format: str = "plain"
    max_connection_age_s: float = 0.0  # 0: connections live forever
    # TopActivations (issue 7): named dataset folders, where indexes live, what is built within a call.
    datasets: tuple[tuple[str, Path], ...] = ()
    index_dir: Path | None = None  # None: the per-user cache directory
    index_on_demand_images: int = 2000  # datasets up to this size are scanned within a call's deadline
    # The HTTP front (issue 14, transport/http/): off unless a port is given; 0 picks a free one.
    http_port: int | None = None
    http_host: str | None = None  # None: the gRPC --host
    kserve_aliases: tuple[tuple[str, str], ...] = ()  # KServe model names answered by a served model
    # Model control (issue 14; service/model_control.py): none | explicit | poll, and the poll period.
    model_control: str = "none"
    repository_poll_s: float = 5.0
    # Start-up (issue #15): every lane's replicas made and run once before the port opens (scheduler/worker.py).
    warm_up: bool = True

    def policy_for(self, device: str) -> BatchPolicy:
        return self.policies.get(device) or DEFAULT_POLICIES["cuda" if device.startswith("cuda") else "cpu"]


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"CONVLENS_{name}", default)


def parse_policy(text: str) -> tuple[str, BatchPolicy]:
    """DEVICE=SIZE[:DELAY_MS[:SHARDS]], e.g. cpu=8:2:2 or cuda:0=32:5; SHARDS (CPU only) defaults to the
    device kind's."""
    device, sep, rest = text.rpartition("=")
    if not sep or not device:
        raise argparse.ArgumentTypeError(f"expected DEVICE=SIZE[:DELAY_MS[:SHARDS]], got {text!r}")
    size, _, tail = rest.partition(":")
    delay, _, shards = tail.partition(":")
    default = DEFAULT_POLICIES["cuda" if device.startswith("cuda") else "cpu"].shards
    try:
        return device, BatchPolicy(int(size), (float(delay) if delay else 2.0) / 1000,
                                   int(shards) if shards else default)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected DEVICE=SIZE[:DELAY_MS[:SHARDS]] with size >= 1, delay >= 0 "
                                         f"and shards >= 1, got {text!r} ({exc})") from None


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
    p.add_argument("--no-warm-up", action="store_true", default=_env("NO_WARM_UP", "") in ("1", "true"),
                   help="make replicas on the first calls instead of at start-up (faster start, slow first calls)")
    p.add_argument("--device", default=_env("DEVICE", "auto"),
                   help="auto (every GPU, else the CPU), cpu, or a list such as cuda:0,cuda:1")
    p.add_argument("--max-message-mb", type=int, default=int(_env("MAX_MESSAGE_MB", "64") or 64))
    p.add_argument("--max-queue", type=int, default=int(_env("MAX_QUEUE", "256") or 256),
                   help="tasks waiting at most; beyond it calls get RESOURCE_EXHAUSTED (default 256)")
    p.add_argument("--max-jobs", type=int, default=int(_env("MAX_JOBS", "64") or 64),
                   help="optimisation jobs (MaximizeUnit, Dream, StyleTransfer) running at once; beyond it "
                        "new ones get RESOURCE_EXHAUSTED (default 64); their steps never count against --max-queue")
    p.add_argument("--threads", type=int, default=int(_env("THREADS", "0") or 0),
                   help="intra-op threads of the CPU worker's compute, split between its shards (default 0: "
                        f"torch's default, {torch.get_num_threads()} here); every other thread runs torch on one")
    p.add_argument("--lone-all-threads", action="store_true",
                   default=_env("LONE_ALL_THREADS", "") not in ("", "0", "false"),
                   help="CPU: run a task that is alone on every intra-op thread (~1.15x faster for a lone "
                        "caller on a dedicated, quiet host; collapses when the cores are shared, so only while "
                        "the CPUs are not contended). Default: on one shard's share, as batches")
    p.add_argument("--fold-batchnorm", action="store_true",
                   default=_env("FOLD_BATCHNORM", "") not in ("", "0", "false"),
                   help="serve requests that read no layer (class-target saliency, class-logit MaximizeUnit) "
                        "on a copy with batch norm folded into the convolutions: ~20%% less compute; logits "
                        "equal to float rounding, gradients but for rare entries behind a rounding-flipped "
                        "ReLU kink (up to a few %% of the map's max; off: Captum's numbers)")
    p.add_argument("--batch", type=parse_policy, action="append", default=[],
                   metavar="DEVICE=SIZE[:DELAY_MS[:SHARDS]]",
                   help="batching policy per device, e.g. --batch cpu=8:2:2 --batch cuda:0=32:5; SHARDS (CPU "
                        f"only, default {DEFAULT_CPU_SHARDS} here): compute threads that split each batch "
                        "(env CONVLENS_BATCH, comma separated)")
    p.add_argument("--grace", type=float, default=float(_env("GRACE", "10") or 10),
                   help="seconds in-flight calls get to finish on SIGTERM/SIGINT (default 10)")
    p.add_argument("--log-level", default=_env("LOG_LEVEL", "INFO"))
    p.add_argument("--log-format", choices=["plain", "json"], default=_env("LOG_FORMAT", "plain"),
                   help="server and access log lines as text or one JSON object per line (default plain)")
    p.add_argument("--metrics-host", default=_env("METRICS_HOST", "0.0.0.0"),
                   help="address the metrics port binds to (default 0.0.0.0; 127.0.0.1 keeps it local)")
    p.add_argument("--tls-cert", type=Path, default=_env("TLS_CERT"), metavar="PEM",
                   help="serve TLS with this certificate chain (needs --tls-key)")
    p.add_argument("--tls-key", type=Path, default=_env("TLS_KEY"), metavar="PEM", help="the certificate's key")
    p.add_argument("--tls-client-ca", type=Path, default=_env("TLS_CLIENT_CA"), metavar="PEM",
                   help="mutual TLS: clients must present a certificate signed by this CA")
    p.add_argument("--auth-tokens", type=Path, default=_env("AUTH_TOKENS_FILE"), metavar="FILE",
                   help="require 'authorization: Bearer <token>'; FILE has one token per line, optionally "
                        "name:token, and is re-read when it changes (env CONVLENS_AUTH_TOKENS_FILE; "
                        "CONVLENS_AUTH_TOKENS holds tokens themselves, comma separated)")
    p.add_argument("--auth-exempt", default=_env("AUTH_EXEMPT", ",".join(ServerConfig.auth_exempt)),
                   metavar="PREFIXES",
                   help="comma-separated method prefixes that need no token (default: health and "
                        "reflection; 'none' exempts nothing)")
    p.add_argument("--max-connection-age", type=float, default=float(_env("MAX_CONNECTION_AGE", "0") or 0),
                   metavar="SECONDS",
                   help="close each connection (GOAWAY; calls in flight finish) after this long so clients "
                        "re-resolve and spread onto new replicas (default 0: never)")
    p.add_argument("--dataset", action="append", default=[], metavar="NAME=DIR",
                   help="a probe dataset for TopActivations: every jpg/png/webp under DIR (repeatable; env "
                        "CONVLENS_DATASET, comma separated); `samples` is always there")
    p.add_argument("--index-dir", type=Path, default=_env("INDEX_DIR"),
                   help="where TopActivations indexes are stored (default ~/.cache/convlens/index)")
    p.add_argument("--index-on-demand", type=int, default=int(_env("INDEX_ON_DEMAND", "2000") or 2000),
                   metavar="IMAGES", help="datasets up to this many images are indexed within a call; larger "
                                          "ones answer FAILED_PRECONDITION while they build (default 2000)")
    p.add_argument("--model-control", choices=["none", "explicit", "poll"], default=_env("MODEL_CONTROL", "none"),
                   help="none: load every --model-repo folder at start, no changes after; explicit: also load, "
                        "reload and unload through the ModelRepositoryService (`convlens repository`); poll: "
                        "follow the folders (new/changed versions loaded, removed ones unloaded) (default none)")
    p.add_argument("--repository-poll-s", type=float, default=float(_env("REPOSITORY_POLL_S", "5") or 5),
                   metavar="SECONDS", help="how often --model-control poll looks at the folders (default 5)")
    p.add_argument("--http-port", type=int, default=_optional_int(_env("HTTP_PORT")), metavar="PORT",
                   help="also serve HTTP on this port: every RPC as POST /convlens.v1.InspectionService/<Method> "
                        "with proto3 JSON (streams as server-sent events) and KServe's v1 /v1/models/NAME[:explain]; "
                        "same tokens, TLS, metrics and batches as gRPC (default: off; 0 picks a free port)")
    p.add_argument("--http-host", default=_env("HTTP_HOST"), help="bind address of the HTTP port (default: --host)")
    return p


def _model_control(p: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    if args.model_control != "none" and not args.model_repo:
        p.error(f"--model-control {args.model_control} needs --model-repo (the folders to load from)")
    if args.repository_poll_s <= 0:
        p.error("--repository-poll-s must be > 0")
    return {"model_control": args.model_control, "repository_poll_s": args.repository_poll_s}


def _optional_int(text: str | None) -> int | None:
    return int(text) if text else None


def _datasets(p: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, object]:
    from convlens.server.datasets.registry import parse_dataset_spec

    specs = [t for t in (_env("DATASET", "") or "").split(",") if t] + list(args.dataset)
    parsed: dict[str, Path] = {}
    for text in specs:
        try:
            name, folder = parse_dataset_spec(text)
        except ValueError as exc:
            p.error(f"--dataset: {exc}")
        if not folder.is_dir():
            p.error(f"--dataset {name}={folder}: {folder} is not a directory")
        if name == "samples" or name in parsed:
            p.error(f"--dataset {name}: the name is already taken")
        parsed[name] = folder
    if args.index_on_demand < 0:
        p.error("--index-on-demand must be >= 0")
    return {"datasets": tuple(parsed.items()), "index_dir": args.index_dir,
            "index_on_demand_images": args.index_on_demand}


def from_args(argv: Sequence[str] | None = None) -> ServerConfig:
    p = parser()
    args = p.parse_args(argv)
    policies = dict(parse_policy(t) for t in (_env("BATCH", "") or "").split(",") if t)
    policies.update(dict(args.batch))
    if not 1 <= args.max_message_mb <= 2047:
        p.error("--max-message-mb must be in 1..2047")
    if args.max_queue < 1:
        p.error("--max-queue must be >= 1")
    if args.max_jobs < 1:
        p.error("--max-jobs must be >= 1")
    if args.threads < 0:
        p.error("--threads must be >= 0 (0: torch's default)")
    return ServerConfig(
        host=args.host, port=args.port, metrics_port=args.metrics_port, metrics=not args.no_metrics,
        model_repo=Path(args.model_repo) if args.model_repo else None, embedded=not args.no_embedded,
        device=args.device, max_message_mb=args.max_message_mb, max_queue=args.max_queue, max_jobs=args.max_jobs,
        threads=args.threads, lone_all_threads=args.lone_all_threads,
        fold_batchnorm=args.fold_batchnorm, grace_seconds=args.grace, policies=policies,
        log_level=args.log_level, warm_up=not args.no_warm_up,
        http_port=args.http_port, http_host=args.http_host, **_operations(p, args), **_datasets(p, args),
        **_model_control(p, args))


def _operations(p: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    if (args.tls_cert is None) != (args.tls_key is None):
        p.error("--tls-cert and --tls-key go together")
    if args.tls_client_ca is not None and args.tls_cert is None:
        p.error("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
    exempt = tuple(x.strip() for x in args.auth_exempt.split(",") if x.strip() and x.strip() != "none")
    if args.max_connection_age < 0:
        p.error("--max-connection-age must be >= 0")
    return dict(metrics_host=args.metrics_host, tls_cert=args.tls_cert, tls_key=args.tls_key,
                tls_client_ca=args.tls_client_ca, auth_tokens_file=args.auth_tokens,
                auth_tokens=_env("AUTH_TOKENS") or None, auth_exempt=exempt, log_format=args.log_format,
                max_connection_age_s=args.max_connection_age)
