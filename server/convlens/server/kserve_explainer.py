"""`convlens kserve-explainer`: ConvLens as a KServe custom explainer container.

KServe starts a custom explainer with the container's own arguments followed by the ones it adds
(kserve/kserve, `pkg/apis/serving/v1beta1/explainer_custom.go`): `--model_name <InferenceService name>`,
`--predictor_host <name>-predictor.<namespace>`, `--http_port 8080` (always appended, even when already
given: the last one wins), and `--workers N` when the component sets containerConcurrency. KServe's own
model servers also take `--grpc_port` (default 8081). Those are parsed here; every other argument is a
`convlens serve` flag (`--model-repo`, `--device`, `--auth-tokens`, ...).

The server then answers KServe's v1 explainer protocol on the HTTP port for `--model_name`
(`/v1/models/NAME`, `/v1/models/NAME:explain`), explaining with the served model `--convlens_model` (default:
a model of that name, else the only or the first served one), and gRPC on the gRPC port for the SDK.

`--predictor_host` is accepted and logged but never called: ConvLens explains white-box, from gradients
through its own copy of the network, which the predictor's v1 HTTP API (predictions only) cannot give.
Point `--model-repo` at the same weights the predictor serves. `--workers` is accepted; one process serves
every request (concurrency comes from the scheduler's batching, and several processes would each hold a
copy of the model and compete for the same device).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import replace

from convlens.server import app
from convlens.server.config import from_args
from convlens.server.transport import access_log

log = logging.getLogger("convlens.server")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convlens kserve-explainer", description=__doc__.split("\n\n")[0],
        epilog="Any other argument is a `convlens serve` flag (convlens serve --help).")
    p.add_argument("--model_name", required=True, help="the name KServe routes to (the InferenceService's)")
    p.add_argument("--predictor_host", default="", help="the predictor's host (accepted, logged, not called)")
    p.add_argument("--http_port", type=int, default=8080, help="KServe v1 HTTP port (default 8080)")
    p.add_argument("--grpc_port", type=int, default=8081, help="ConvLens gRPC port (default 8081)")
    p.add_argument("--workers", type=int, default=1, help="accepted; one process serves (see above)")
    p.add_argument("--convlens_model", default=None,
                   help="the served model that explains --model_name (default: the same name, else the only "
                        "or first served model)")
    return p


def config_from(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """KServe's arguments and the rest (serve flags, to which --http-port and --port are added)."""
    args, rest = parser().parse_known_args(list(argv))
    if args.workers < 1:
        parser().error("--workers must be >= 1")
    serve = [*rest, "--http-port", str(args.http_port)]
    if not any(a == "--port" or a.startswith("--port=") for a in rest):
        serve += ["--port", str(args.grpc_port)]
    return args, serve


def main(argv: Sequence[str] | None = None) -> int:
    import sys

    args, serve = config_from(sys.argv[1:] if argv is None else argv)
    config = from_args(serve)
    # The alias is resolved once the repository is loaded (app.ConvLensServer picks the model then).
    config = replace(config, kserve_aliases=((args.model_name, args.convlens_model or ""),))
    access_log.configure(config.log_format, config.log_level)
    log.info(
        "KServe explainer for %r (predictor %s, not called: explanations are computed here, white-box); "
        "%d worker(s) requested, one process serves", args.model_name, args.predictor_host or "-", args.workers)
    return int(app.run(config))


if __name__ == "__main__":
    raise SystemExit(main())
