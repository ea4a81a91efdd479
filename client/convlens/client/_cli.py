"""The `convlens` command: a thin argparse layer over Client, the load tester, and (lazily) the server."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ._client import Client
from ._config import TLS, TLSArg
from ._convert import SALIENCY_METHODS, SALIENCY_OUTPUTS
from ._exceptions import ConvLensError
from ._types import Target, Unit

_DEFAULT_SERVER = "localhost:50051"
# Global options that take a value: needed to find the command word before argparse sees `serve`'s args.
_VALUE_OPTS = ("-s", "--server", "--token", "--timeout", "--root-certs", "--client-cert", "--client-key",
               "--server-name")

_EPILOG = """\
The server address is -s/--server (env CONVLENS_SERVER, then CONVLENS_TARGET); `saliency --target`
is the class index to explain, not the server.

examples:
  convlens models
  convlens -s gpu-box:50051 layers efficientnet_lite0
  convlens filters efficientnet_lite0 _conv_stem -o stem.png --npy stem.npy
  convlens saliency cat.jpg --target 281 --method guided_backprop -o cat_gbp.png
  convlens saliency cat.jpg --unit _blocks.10:5:3:4 --method gradient -o unit.png
  convlens maximize efficientnet_lite0 --target 130 -o flamingo.png
  convlens maximize efficientnet_lite0 --unit _blocks.10:5 --preset maco --steps 256 -o unit.png
  convlens dream cat.jpg -o dream.png
  convlens style cat.jpg bricks.png --soften channels -o brick_cat.png
  convlens loadtest --rpc saliency --concurrency 1,4,16 --duration 20 --csv sweep.csv \\
      --metrics-url http://localhost:9464/metrics
  convlens top efficientnet_lite0 _blocks.4 7 -k 9 --dataset samples -o unit.png
  convlens datasets
  convlens atlas efficientnet_lite0 -o atlas/ --layers _blocks.2,_blocks.8 --channels 0-7 --jobs 4
  convlens index build efficientnet_lite0 photos _blocks.10 --dataset photos=/data/photos --shard 0/4
  convlens serve --help
  convlens serve --http-port 8080     # also HTTP/JSON + KServe v1
  convlens kserve-explainer --model_name cat-classifier --predictor_host p.ns --http_port 8080
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convlens", description="Look inside the CNNs a ConvLens server serves.",
                                epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    env_server = os.environ.get("CONVLENS_SERVER") or os.environ.get("CONVLENS_TARGET") or _DEFAULT_SERVER
    p.add_argument("-s", "--server", default=env_server, metavar="HOST:PORT",
                   help=f"server address or gRPC target (default: {env_server})")
    p.add_argument("--token", default=os.environ.get("CONVLENS_TOKEN"),
                   help="bearer token (env CONVLENS_TOKEN)")
    p.add_argument("--tls", action="store_true", help="use TLS with the system's root certificates")
    p.add_argument("--root-certs", metavar="PEM", default=os.environ.get("CONVLENS_ROOT_CERTS"),
                   help="use TLS with these root certificates (env CONVLENS_ROOT_CERTS)")
    p.add_argument("--client-cert", metavar="PEM", default=os.environ.get("CONVLENS_CLIENT_CERT"),
                   help="mutual TLS: this client certificate chain (with --client-key; implies TLS)")
    p.add_argument("--client-key", metavar="PEM", default=os.environ.get("CONVLENS_CLIENT_KEY"),
                   help="mutual TLS: the client certificate's key")
    p.add_argument("--server-name", metavar="NAME", help="TLS: check the server certificate against this name")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per call (default 30)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("models", help="list the served models")

    s = sub.add_parser("health", help="gRPC health check: prints the status; exit 0 only when SERVING")
    s.add_argument("--service", default="", help="service to ask about (default: the whole server)")

    s = sub.add_parser("layers", help="a model's layer catalog")
    s.add_argument("model")

    s = sub.add_parser("filters", help="a conv layer's weights and filter grid")
    s.add_argument("model")
    s.add_argument("layer")
    s.add_argument("-o", "--output", metavar="PNG", help="write the filter grid here")
    s.add_argument("--npy", metavar="NPY", help="write the weights [out, in, kh, kw] here")
    s.add_argument("--scaling", choices=["minmax", "symmetric"], default="minmax")
    s.add_argument("--max-filters", type=int)
    s.add_argument("--max-input-channels", type=int)

    s = sub.add_parser("saliency", help="which pixels a class or unit depends on")
    s.add_argument("image", help="image file")
    s.add_argument("--model", default="efficientnet_lite0")
    what = s.add_mutually_exclusive_group()
    what.add_argument("--target", type=int, metavar="CLASS", help="class index to explain (default: top-1)")
    what.add_argument("--unit", metavar="LAYER:CHANNEL[:Y:X]", help="a unit instead of a class")
    s.add_argument("--reduction", choices=["mean", "max"], default="mean", help="for --unit without Y:X")
    s.add_argument("--method", choices=list(SALIENCY_METHODS), default="gradient", metavar="METHOD",
                   help=f"{', '.join(SALIENCY_METHODS)} (default gradient)")
    s.add_argument("-o", "--output", metavar="PNG", help="write the overlay here")
    s.add_argument("--npy", metavar="NPY", help="write the attribution [C, H, W] here")
    s.add_argument("--samples", type=int, help="smoothgrad")
    s.add_argument("--noise-level", type=float, help="smoothgrad")
    s.add_argument("--base-method", choices=list(SALIENCY_METHODS), metavar="METHOD", help="smoothgrad")
    s.add_argument("--seed", type=int, help="smoothgrad")
    s.add_argument("--steps", type=int, help="integrated_gradients")
    s.add_argument("--baseline", help="integrated_gradients: black, blurred or an image file")
    s.add_argument("--cam-layer", help="grad_cam / guided_grad_cam")
    s.add_argument("--outputs", type=_outputs_arg, metavar="LIST",
                   help="comma-separated outputs to compute and send: attribution, heatmap, overlay, predictions "
                        "(default: what -o / --npy and the printout need)")

    s = sub.add_parser("maximize", help="synthesise an image that excites a class or unit (streams progress)")
    s.add_argument("model", help="a served model, e.g. efficientnet_lite0")
    what = s.add_mutually_exclusive_group(required=True)
    what.add_argument("--target", type=int, metavar="CLASS", help="class index whose logit to maximise")
    what.add_argument("--unit", metavar="LAYER:CHANNEL[:Y:X]", help="a unit or (without Y:X) a channel")
    s.add_argument("--reduction", choices=["mean", "max"], default="mean", help="for --unit without Y:X")
    s.add_argument("--preset", choices=["lucid", "lecture", "maco"], default="lucid",
                   help="recipe: lucid (FFT, default), lecture (pixels + L2/blur/zeroing), maco (phase only)")
    s.add_argument("-o", "--output", metavar="PNG", help="write the image here")
    s.add_argument("--steps", type=int)
    s.add_argument("--size", type=int, help="side in pixels (default 224)")
    s.add_argument("--seed", type=int, help="default: random (printed, so the image can be reproduced)")
    s.add_argument("--lr", type=float, dest="learning_rate", help="Adam's learning rate")
    s.add_argument("--parameterization", choices=["fft", "pixel", "maco"])
    s.add_argument("--images", type=int, help="optimise N images in one job (-o img.png writes img-1.png ...)")
    s.add_argument("--diversity", type=float, help="weight of Lucid's diversity objective (with --images >= 2)")
    s.add_argument("--diversity-layer", help="layer of its Gram matrices (default: the unit's layer)")
    s.add_argument("--deadline", type=float, default=600.0, help="seconds the whole run may take (default 600)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")

    s = sub.add_parser("atlas", help="build a static unit atlas (model, layer, unit pages) through the SDK")
    s.add_argument("model", help="a served model, e.g. efficientnet_lite0")
    s.add_argument("-o", "--output", required=True, metavar="DIR", help="the site's folder (resumable)")
    where = s.add_mutually_exclusive_group()
    where.add_argument("--layers", help="comma-separated layer names (default: every 4th block)")
    where.add_argument("--every-nth-block", type=int, default=4, metavar="N", help="every Nth block (default 4)")
    s.add_argument("--channels", default="0-15", help="e.g. 0-15 or 0,3,7 (default 0-15)")
    s.add_argument("--dataset", default="samples", help="dataset for the top examples (default samples)")
    s.add_argument("--steps", type=int, default=128, help="optimisation steps per visualisation (default 128)")
    s.add_argument("--size", type=int, default=128, help="visualisation side in pixels (default 128)")
    s.add_argument("--jobs", type=int, default=4, help="units computed in parallel (default 4)")
    s.add_argument("--top", type=int, default=6, dest="top_k", help="top dataset regions per unit (default 6)")
    s.add_argument("--diverse", type=int, default=4, dest="diverse_images",
                   help="images in the diverse set, one job (default 4; 0 or 1: none)")
    s.add_argument("--diversity", type=float, default=20.0, help="weight of the diversity objective")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--compare", metavar="MODEL2", help="a second model, layers matched by relative depth")
    s.add_argument("--quiet", action="store_true", help="no progress bar")

    s = sub.add_parser("dream", help="DeepDream an image at a layer (streams progress)")
    s.add_argument("image", help="an image file")
    s.add_argument("-m", "--model", default="efficientnet_lite0")
    s.add_argument("--layer", help="default: the model's dream layer")
    s.add_argument("--channel", type=int, help="only this channel of the layer")
    s.add_argument("--guide", metavar="IMAGE", help="dream toward this image's features")
    s.add_argument("--octaves", type=int)
    s.add_argument("--steps", type=int, dest="steps_per_octave", help="steps per octave (default 10)")
    s.add_argument("--step-size", type=float, dest="step_size")
    s.add_argument("--max-size", type=int, dest="max_size", help="longest side dreamed at (default 512)")
    s.add_argument("--seed", type=int)
    s.add_argument("-o", "--output", metavar="PNG", help="write the image here")
    s.add_argument("--deadline", type=float, default=600.0, help="seconds the whole run may take (default 600)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")

    s = sub.add_parser("style", help="carry STYLE's texture onto CONTENT (Gatys; streams progress)")
    s.add_argument("content", help="the content image file")
    s.add_argument("style", help="the style image file")
    s.add_argument("-m", "--model", default="efficientnet_lite0")
    s.add_argument("--style-weight", type=float, dest="style_weight")
    s.add_argument("--content-weight", type=float, dest="content_weight")
    s.add_argument("--soften", choices=["none", "channels", "positions", "all"],
                   help="softmax transform of the features (Wang et al.); default: the model's")
    s.add_argument("--style-distance", choices=["mse", "relative"], dest="style_distance",
                   help="how each style layer's Gram matrix is compared; default: the model's")
    s.add_argument("--temperature", type=float)
    s.add_argument("--optimizer", choices=["adam", "lbfgs"])
    s.add_argument("--init", choices=["content", "noise"])
    s.add_argument("--steps", type=int)
    s.add_argument("--size", type=int, help="longest side of the output (default 256)")
    s.add_argument("--seed", type=int)
    s.add_argument("-o", "--output", metavar="PNG", help="write the image here")
    s.add_argument("--deadline", type=float, default=600.0, help="seconds the whole run may take (default 600)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")

    s = sub.add_parser("top", help="the dataset regions that most excite a unit (a contact sheet with -o)")
    s.add_argument("model")
    s.add_argument("layer")
    s.add_argument("channel", type=int)
    s.add_argument("-k", type=int, default=9, help="entries (default 9)")
    s.add_argument("--dataset", default="samples", help="dataset name (`convlens datasets`; default samples)")
    s.add_argument("--ranking", choices=["max", "mean"], default="max")
    s.add_argument("--max-per-image", type=int, default=1, help="regions one image may give (default 1)")
    s.add_argument("--images", action="store_true", help="sheet of the boxed photos instead of the crops")
    s.add_argument("-o", "--output", metavar="PNG", help="write the contact sheet here")

    sub.add_parser("datasets", help="the datasets TopActivations ranks on, and their indexes")

    s = sub.add_parser("repository", help="model control: list the server's model repository, load, reload or "
                                          "unload a model (load/unload need an admin token with --auth-tokens)")
    action = s.add_subparsers(dest="action", required=True, metavar="ACTION")
    r = action.add_parser("list", help="every model folder (each version) and embedded model, with its state")
    r.add_argument("--ready", action="store_true", help="only READY versions")
    for verb, text in (("load", "load or reload a model folder (every version, or --version N)"),
                       ("unload", "stop serving a model (every version, or --version N)")):
        r = action.add_parser(verb, help=text)
        r.add_argument("model", help="the model folder's name (NAME@VERSION also names a version)")
        r.add_argument("--version", type=int, help="only this version")

    sub.add_parser("index", help="build TopActivations indexes ahead of time, without a server (needs "
                                 "`pip install 'convlens[server]'`): `convlens index build --help`", add_help=False)

    sub.add_parser("serve", help="run the server (needs `pip install 'convlens[server]'`); "
                                 "arguments after `serve` go to it unparsed", add_help=False)
    sub.add_parser("kserve-explainer", help="run the server as a KServe custom explainer (--model_name, "
                                            "--predictor_host, --http_port as KServe passes them; then serve "
                                            "flags): `convlens kserve-explainer --help`", add_help=False)

    s = sub.add_parser("loadtest", help="concurrency sweep: throughput, latency, server queue/compute split")
    s.add_argument("--rpc", choices=["saliency", "get_filters", "list_models"], default="saliency")
    s.add_argument("--model", default="efficientnet_lite0")
    s.add_argument("--layer", default="_conv_stem", help="for get_filters")
    s.add_argument("--image", help="for saliency (default: a synthetic 224x224 pattern)")
    s.add_argument("--method", choices=list(SALIENCY_METHODS), default="gradient", metavar="METHOD",
                   help="for saliency (default gradient)")
    s.add_argument("--concurrency", default="1,4,16,32", help="comma-separated levels (default 1,4,16,32)")
    s.add_argument("--duration", type=float, default=20.0, help="measured seconds per level")
    s.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each level")
    s.add_argument("--channels", type=int, default=1, help="connections the callers share")
    s.add_argument("--csv", metavar="CSV", help="write one row per level here")
    s.add_argument("--metrics-url", help="server's Prometheus endpoint, e.g. http://host:9464/metrics")
    s.add_argument("--outputs", type=_loadtest_outputs_arg, default="heatmap,predictions", metavar="LIST",
                   help="saliency: the outputs each call asks for (default heatmap,predictions; 'all': the "
                        "server's default answer, with the float attribution)")
    return p


def _command_index(argv: Sequence[str]) -> int | None:
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok in _VALUE_OPTS:
            i += 2
        elif tok.startswith("-"):
            i += 1
        else:
            return i
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    i = _command_index(argv)
    if i is not None and argv[i] == "serve":
        return _serve(argv[i + 1:])  # everything after `serve` belongs to the server's own parser
    if i is not None and argv[i] == "index":
        return _index(argv[i + 1:])
    if i is not None and argv[i] == "kserve-explainer":
        return _server_command("convlens.server.kserve_explainer", "kserve-explainer", argv[i + 1:])
    args = _parser().parse_args(argv)
    tls = _tls(args)
    try:
        if args.command == "loadtest":
            return _loadtest(args, tls)
        with Client(args.server, tls=tls, token=args.token, timeout=args.timeout) as client:
            result: int = _COMMANDS[args.command](client, args)
            return result
    except ConvLensError as e:
        reason = f" [{e.reason}]" if e.reason else ""  # the server's ErrorInfo reason, stable for scripts
        print(f"error: {e.code.name}: {e.message}{reason}", file=sys.stderr)
        for v in e.field_violations:
            print(f"  {v.field}: {v.description}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `convlens layers M | head`: the reader left, which is not an error
        _silence_stdout()
        return 0
    except (ValueError, TypeError, OSError) as e:  # local: bad file, bad argument
        print(f"error: {e}", file=sys.stderr)
        return 2


def _tls(args: argparse.Namespace) -> TLSArg:
    if (args.client_cert is None) != (args.client_key is None):
        raise SystemExit("error: --client-cert and --client-key go together")
    if args.root_certs or args.client_cert or args.server_name:
        return TLS.from_files(args.root_certs, private_key=args.client_key, certificate_chain=args.client_cert,
                              server_name=args.server_name)
    return bool(args.tls)


def _health(client: Client, args: argparse.Namespace) -> int:
    try:
        status = client.health(args.service)
    except ConvLensError as e:  # not reachable, or refused: unhealthy for a probe, with the reason
        print(f"unhealthy: {e.code.name}: {e.message}", file=sys.stderr)
        return 1
    print(status)
    return 0 if status == "SERVING" else 1


def _silence_stdout() -> None:
    # Python flushes stdout again at exit and would report the broken pipe there; point it at /dev/null.
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # stdout without a file descriptor (captured in tests)
        pass


def _server_command(module: str, command: str, rest: list[str]) -> int:
    """Run `module.main(rest)` from the server package. Imported lazily: the SDK must import (and the client
    commands must run) without torch installed."""
    try:
        entry = importlib.import_module(module).main
    except ImportError as e:
        print(f"error: `convlens {command}` needs `pip install 'convlens[server]'`", file=sys.stderr)
        print(f"  ({e})", file=sys.stderr)
        return 2
    rc: Any = entry(rest)
    return int(rc or 0)


def _serve(rest: list[str]) -> int:
    return _server_command("convlens.server.app", "serve", rest)


def _index(rest: list[str]) -> int:
    return _server_command("convlens.server.indexing.cli", "index", rest)


def _top(client: Client, args: argparse.Namespace) -> int:
    from ._contact_sheet import contact_sheet

    top = client.top_activations(args.model, args.layer, args.channel, k=args.k, dataset=args.dataset,
                                 ranking=args.ranking, max_per_image=args.max_per_image,
                                 crops=bool(args.output) and not args.images,
                                 include_images=bool(args.output) and args.images)
    s = top.stats
    if s is not None:
        print(f"{args.layer}:{args.channel} over {s.images} images of {top.dataset or 'your images'}: "
              f"mean {s.mean:.4g}, max {s.max:.4g}, positive {s.positive_fraction:.1%}")
    _table(["#", "SCORE", "Y", "X", "BOX (ORIGINAL)", "SOURCE"],
           [[str(i + 1), f"{e.score:.4g}", str(e.y), str(e.x), ",".join(map(str, e.original_box)), e.source]
            for i, e in enumerate(top)])
    if args.output:
        title = f"{args.model} {args.layer}:{args.channel} ({args.ranking}) on {top.dataset or 'your images'}"
        contact_sheet(top, title=title, use_images=args.images).save(args.output)
        print(f"wrote {args.output}")
    return 0


def _datasets(client: Client, args: argparse.Namespace) -> int:
    rows = []
    for d in client.list_datasets():
        ready = [f"{i.model}:{i.layer}" for i in d.indexes if i.state == "ready"]
        building = [f"{i.model}:{i.layer} {i.images_done}/{i.images_total}" for i in d.indexes
                    if i.state == "building"]
        rows.append([d.name, str(d.image_count), str(d.skipped_count), d.digest[:12],
                     ", ".join(ready) or "-", ", ".join(building) or "-", d.description])
    _table(["NAME", "IMAGES", "SKIPPED", "DIGEST", "INDEXES", "BUILDING", "DESCRIPTION"], rows)
    return 0


def _repository(client: Client, args: argparse.Namespace) -> int:
    if args.action == "list":
        entries = client.repository_index(ready_only=args.ready)
    elif args.action == "load":
        entries = client.load_model(args.model, args.version)
    else:
        entries = client.unload_model(args.model, args.version)
    _table(["NAME", "VERSION", "STATE", "DEFAULT", "SOURCE", "REASON"],
           [[e.name, str(e.version), e.state, "*" if e.default else "", e.source, e.reason or "-"] for e in entries])
    return 0


def _models(client: Client, args: argparse.Namespace) -> int:
    rows = [[m.name, m.format, f"{m.input_size[0]}x{m.input_size[1]}", str(m.num_classes),
             f"{m.parameter_count:,}", "yes" if m.supports_gradients else "no", m.description]
            for m in client.list_models()]
    _table(["NAME", "FORMAT", "INPUT", "CLASSES", "PARAMS", "GRADIENTS", "DESCRIPTION"], rows)
    return 0


def _layers(client: Client, args: argparse.Namespace) -> int:
    details = client.get_model(args.model)
    rows = []
    for layer in details.layers:
        rf = layer.receptive_field
        rows.append([layer.name, layer.type, "x".join(map(str, layer.output_shape)),
                     f"{layer.parameter_count:,}",
                     f"{rf.size[0]}x{rf.size[1]}" if rf else "-", f"{rf.jump[0]}x{rf.jump[1]}" if rf else "-",
                     "yes" if layer.has_filters else ""])
    _table(["NAME", "TYPE", "OUTPUT", "PARAMS", "RF", "JUMP", "FILTERS"], rows)
    return 0


def _filters(client: Client, args: argparse.Namespace) -> int:
    f = client.get_filters(args.model, args.layer, grid=bool(args.output), scaling=args.scaling,
                           max_filters=args.max_filters, max_input_channels=args.max_input_channels)
    print(f"{args.layer}: {f.layer_type} weights {list(f.weights.shape)} groups {f.groups} "
          f"stride {list(f.stride)} padding {list(f.padding)} dilation {list(f.dilation)} "
          f"bias {'yes' if f.bias is not None else 'no'}")
    print(f"dead channels ({len(f.dead_channels)}): {f.dead_channels}")
    if args.npy:
        np.save(args.npy, f.weights)
        print(f"wrote {args.npy}")
    if args.output:
        if f.grid is None:
            print("the server rendered no grid", file=sys.stderr)
        else:
            f.grid.save(args.output)
            print(f"wrote {args.output}")
    return 0


def _parse_unit(text: str, reduction: str) -> Unit:
    parts = text.split(":")
    try:
        if len(parts) == 2:
            return Unit(parts[0], int(parts[1]), reduction="max" if reduction == "max" else "mean")
        if len(parts) == 4:
            return Unit(parts[0], int(parts[1]), int(parts[2]), int(parts[3]))
    except ValueError:
        pass
    raise ValueError(f"--unit {text!r}: expected LAYER:CHANNEL or LAYER:CHANNEL:Y:X with integers")


def _loadtest_outputs_arg(text: str) -> tuple[str, ...] | None:
    return None if text.strip() == "all" else _outputs_arg(text)


def _outputs_arg(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in SALIENCY_OUTPUTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(SALIENCY_OUTPUTS)}")
    return names


def _saliency(client: Client, args: argparse.Namespace) -> int:
    target: Target | None = _parse_unit(args.unit, args.reduction) if args.unit else args.target
    outputs = args.outputs
    if outputs is None:  # only what this command prints or writes
        outputs = ("predictions", *(("overlay",) if args.output else ()),
                   *(("attribution",) if args.npy else ()))
    s = client.saliency(args.image, args.model, target=target, method=args.method, samples=args.samples,
                        noise_level=args.noise_level, base_method=args.base_method, seed=args.seed,
                        steps=args.steps, baseline=args.baseline, cam_layer=args.cam_layer,
                        overlay=False, outputs=outputs)
    what = _describe(s.target)
    shape = "not asked" if s.attribution is None else list(s.attribution.shape)
    print(f"{args.method} of {what} (value {s.target_value:.4g}); attribution {shape}")
    for p in s.predictions[:5]:
        print(f"  {p.class_index:>5}  {p.probability:7.2%}  logit {p.logit:8.3f}  {p.label}")
    if s.modified_activations:
        print(f"modified activations: {s.modified_activations}")
    for note in s.notes:
        print(f"note: {note}")
    if args.npy and s.attribution is not None:
        np.save(args.npy, s.attribution)
        print(f"wrote {args.npy}")
    if args.output:
        # Without a server-rendered overlay, the heatmap alone is still worth writing.
        if s.overlay is not None:
            s.overlay.save(args.output)
        elif s.heatmap is not None:
            _grey(s.heatmap).save(args.output)
        print(f"wrote {args.output}")
    return 0


def _maximize(client: Client, args: argparse.Namespace) -> int:
    target: Target = _parse_unit(args.unit, args.reduction) if args.unit else args.target
    bar = None if args.quiet else _ProgressBar(sys.stderr)
    options = {k: getattr(args, k) for k in ("steps", "size", "seed", "learning_rate", "parameterization",
                                             "images", "diversity", "diversity_layer")
               if getattr(args, k) is not None}
    r = client.maximize_unit(args.model, target, preset=args.preset, on_progress=bar,
                             timeout=max(args.timeout, args.deadline), **options)
    if bar is not None:
        bar.finish()
    print(f"{_describe(target)}: objective {r.objective:.4g}")
    for p in r.predictions[:5]:
        print(f"  {p.class_index:>5}  {p.probability:7.2%}  logit {p.logit:8.3f}  {p.label}")
    if r.settings:
        print("settings: " + " ".join(f"{k}={v}" for k, v in r.settings.items()))
    if len(r.images) > 1:
        print(f"{len(r.images)} images, mean pairwise Gram similarity {r.gram_similarity:.3f}; objectives "
              + " ".join(f"{i.objective:.4g}" for i in r.images))
    if args.output and len(r.images) > 1:
        stem, dot, ext = args.output.rpartition(".")
        for n, item in enumerate(r.images, 1):
            path = f"{stem}-{n}.{ext}" if dot else f"{args.output}-{n}.png"
            item.image.save(path)
            print(f"wrote {path}")
    elif args.output:
        r.image.save(args.output)
        print(f"wrote {args.output}")
    return 0


def _options(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    return {k: getattr(args, k) for k in names if getattr(args, k) is not None}


def _dream(client: Client, args: argparse.Namespace) -> int:
    bar = None if args.quiet else _ProgressBar(sys.stderr)
    options = _options(args, ("channel", "octaves", "steps_per_octave", "step_size", "max_size", "seed"))
    if args.guide:
        options["guide"] = args.guide
    r = client.dream(args.image, args.model, args.layer, on_progress=bar,
                     timeout=max(args.timeout, args.deadline), **options)
    if bar is not None:
        bar.finish()
    gain = r.objective / r.input_objective if r.input_objective else float("nan")
    print(f"objective {r.objective:.4g} (input {r.input_objective:.4g}, x{gain:.2f})")
    if r.settings:
        print("settings: " + " ".join(f"{k}={v}" for k, v in r.settings.items()))
    if args.output:
        r.image.save(args.output)
        print(f"wrote {args.output}")
    return 0


def _style(client: Client, args: argparse.Namespace) -> int:
    bar = None if args.quiet else _ProgressBar(sys.stderr)
    options = _options(args, ("style_weight", "content_weight", "soften", "style_distance", "temperature",
                              "optimizer", "init", "steps", "size", "seed"))
    r = client.style_transfer(args.content, args.style, args.model, on_progress=bar,
                              timeout=max(args.timeout, args.deadline), **options)
    if bar is not None:
        bar.finish()
    drop = 1 - r.style_loss / r.initial_style_loss if r.initial_style_loss else float("nan")
    print(f"style loss {r.style_loss:.4g} ({drop:.1%} below the start), content loss {r.content_loss:.4g}")
    if r.settings:
        print("settings: " + " ".join(f"{k}={v}" for k, v in r.settings.items()))
    if args.output:
        r.image.save(args.output)
        print(f"wrote {args.output}")
    return 0


class _ProgressBar:
    """`[#####-----]  12/512  objective 3.21` on one line of a terminal stream."""

    def __init__(self, stream: Any, width: int = 30) -> None:
        self.stream, self.width, self.shown = stream, width, False

    def __call__(self, p: Any) -> None:
        filled = int(self.width * p.step / max(p.total, 1))
        shown = {k: v for k, v in p.objectives.items() if k in ("objective", "style", "content")}
        tail = "".join(f"  {k} {v:.4g}" for k, v in shown.items())
        self.stream.write(f"\r[{'#' * filled}{'-' * (self.width - filled)}] {p.step:>5}/{p.total}{tail}")
        self.stream.flush()
        self.shown = True

    def finish(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()


def _describe(target: Target | None) -> str:
    if isinstance(target, Unit):
        where = f" at y={target.y} x={target.x}" if target.y is not None else f" ({target.reduction})"
        return f"unit {target.layer}:{target.channel}{where}"
    return f"class {target}" if target is not None else "the top-1 class"


def _grey(heatmap: np.ndarray[Any, Any]) -> Image.Image:
    h = np.abs(heatmap.astype(np.float32))
    peak = float(h.max()) if h.size else 0.0
    return Image.fromarray((255 * h / peak if peak > 0 else h).astype(np.uint8), mode="L")


def _loadtest(args: argparse.Namespace, tls: TLSArg) -> int:
    from . import loadtest as lt  # asyncio machinery only for this command

    try:
        levels = tuple(int(x) for x in args.concurrency.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--concurrency {args.concurrency!r}: expected comma-separated integers") from None
    cfg = lt.LoadTestConfig(target=args.server, rpc=args.rpc, model=args.model, layer=args.layer,
                            image=Path(args.image) if args.image else None, method=args.method,
                            concurrency=levels, duration=args.duration, warmup=args.warmup,
                            metrics_url=args.metrics_url, channels=args.channels, tls=tls, token=args.token,
                            timeout=args.timeout, outputs=args.outputs)
    print(f"{args.rpc} on {args.server}, {args.duration:g} s per level after {args.warmup:g} s warm-up")
    print(lt.format_table([], header=True), end="", flush=True)
    results = lt.run_loadtest(
        cfg, on_level=lambda r: print(lt.format_table([r], header=False), end="", flush=True))
    if args.csv:
        lt.write_csv(results, args.csv)
        print(f"wrote {args.csv}")
    return 0


def _table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _atlas(client: Client, args: argparse.Namespace) -> int:
    from .atlas import AtlasOptions, build_atlas, parse_channels

    try:
        options = AtlasOptions(
            model=args.model, layers=tuple(x.strip() for x in args.layers.split(",") if x.strip()) if args.layers
            else (), every_nth_block=args.every_nth_block, channels=parse_channels(args.channels),
            dataset=args.dataset, steps=args.steps, size=args.size, jobs=args.jobs, top_k=args.top_k,
            diverse_images=args.diverse_images, diversity=args.diversity, seed=args.seed, compare=args.compare,
            timeout=max(args.timeout, 900.0))
        report = build_atlas(client, args.output, options, progress=None if args.quiet else sys.stderr)
    except ValueError as e:
        print(f"convlens atlas: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nstopped; finished units are kept in {args.output}: run the same command to resume",
              file=sys.stderr)
        return 130
    print(f"{report.units} units ({report.computed} computed, {report.reused} already done) in "
          f"{report.seconds:.0f} s; open {Path(args.output) / 'index.html'}")
    return 0


_COMMANDS = {"atlas": _atlas,
             "health": _health, "models": _models, "layers": _layers, "filters": _filters, "saliency": _saliency,
             "maximize": _maximize, "top": _top, "datasets": _datasets, "dream": _dream, "style": _style,
             "repository": _repository}


if __name__ == "__main__":
    sys.exit(main())
