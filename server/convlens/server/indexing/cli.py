"""`convlens index build|merge`: build indexes ahead of time, without a server.

    convlens index build MODEL DATASET LAYER [--shard I/N] [--ray [ADDRESS]] [--index-dir DIR]
    convlens index merge MODEL DATASET LAYER [--index-dir DIR]

A shard writes <layer>.shard-I-of-N.npz beside where the full index goes; `merge` combines every shard of
the current key into <layer>.npz (exactly the one-pass index). In a Kubernetes Indexed Job, `--shard N`
(or `--shard /N`) takes I from JOB_COMPLETION_INDEX. A server started with the same --index-dir (and the
same model weights and dataset contents) answers from the result at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from convlens.server.datasets.registry import parse_dataset_spec
from convlens.server.indexing.build import Timings, build_index, index_key, merge_shards
from convlens.server.indexing.sources import DatasetSource, ModelSource
from convlens.server.indexing.store import default_index_dir, load_if_valid, save


def parse_shard(text: str | None, env: dict[str, str] | None = None) -> tuple[int, int]:
    """"I/N" -> (I, N); "N" or "/N" -> (JOB_COMPLETION_INDEX, N); None -> (0, 1)."""
    env = dict(os.environ) if env is None else env
    if text is None:
        return 0, 1
    index, sep, count = text.rpartition("/")
    if not index:
        if "JOB_COMPLETION_INDEX" not in env:
            raise ValueError(f"--shard {text}: no shard index given and JOB_COMPLETION_INDEX is not set")
        index = env["JOB_COMPLETION_INDEX"]
    try:
        i, n = int(index), int(count)
    except ValueError:
        raise ValueError(f"--shard expects I/N (or N with JOB_COMPLETION_INDEX set), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard {i}/{n}: need 0 <= I < N")
    return i, n


class Bar:
    """A one-line progress bar on stderr (a log line per 10% when stderr is not a terminal)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.started = time.monotonic()
        self.tty = sys.stderr.isatty()
        self.next_tenth = 0

    def __call__(self, done: int, total: int) -> None:
        fraction = done / total if total else 1.0
        rate = done / max(time.monotonic() - self.started, 1e-9)
        text = f"{self.label} [{'#' * int(fraction * 30):<30}] {done}/{total} images, {rate:.1f}/s"
        if self.tty:
            print("\r" + text, end="" if done < total else "\n", file=sys.stderr, flush=True)
        elif fraction * 10 >= self.next_tenth or done >= total:
            print(text, file=sys.stderr, flush=True)
            self.next_tenth = int(fraction * 10) + 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convlens index", description="Build TopActivations indexes ahead of time.")
    sub = p.add_subparsers(dest="action", required=True)
    for action, text in (("build", "scan a dataset (or one shard of it) and store the index"),
                         ("merge", "merge the shards of an index into the full index")):
        s = sub.add_parser(action, help=text)
        s.add_argument("model")
        s.add_argument("dataset", help="samples, or a NAME given with --dataset NAME=DIR")
        s.add_argument("layer")
        s.add_argument("--index-dir", type=Path, default=os.environ.get("CONVLENS_INDEX_DIR") or default_index_dir())
        s.add_argument("--dataset", dest="datasets", action="append", default=[], metavar="NAME=DIR",
                       help="a dataset folder (repeatable; env CONVLENS_DATASET, comma separated)")
        s.add_argument("--model-repo", type=Path, default=os.environ.get("CONVLENS_MODEL_REPO"))
        if action == "build":
            s.add_argument("--shard", metavar="I/N", help="build shard I of N (N alone: I from JOB_COMPLETION_INDEX)")
            s.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                           help="run the scan on a Ray cluster (ADDRESS, or a local one when omitted)")
            s.add_argument("--batch-size", type=int, default=8)
            s.add_argument("--force", action="store_true", help="build even when the index exists")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    try:
        specs = [parse_dataset_spec(t) for t in (os.environ.get("CONVLENS_DATASET") or "").split(",") if t]
        specs += [parse_dataset_spec(t) for t in args.datasets]
        model_source = ModelSource(args.model, args.model_repo)
        dataset_source = DatasetSource(args.dataset, tuple(specs))
        model, dataset = model_source.load(), dataset_source.load()
        key = index_key(model, dataset, args.layer)
        if args.action == "merge":
            pattern = f"{key.path(args.index_dir).stem}.shard-*-of-*.npz"
            paths = sorted(key.folder(args.index_dir).glob(pattern))
            merged = merge_shards(paths)
            save(merged, key.path(args.index_dir))
            print(f"merged {len(paths)} shards ({merged.count} images) into {key.path(args.index_dir)}")
            return 0
        shard, shards = parse_shard(args.shard)
        out = key.path(args.index_dir) if shards == 1 else key.shard_path(args.index_dir, shard, shards)
        if not args.force and load_if_valid(out, key) is not None:  # a damaged file is built again
            print(f"{out} exists (same weights, dataset and layer); --force builds it again")
            return 0
        n = len(dataset.listing().images[shard::shards])
        bar = Bar(f"{args.model}/{args.dataset}/{args.layer} shard {shard}/{shards}")
        timings = Timings()
        started = time.perf_counter()
        if args.ray is not None:
            from convlens.server.indexing.ray_build import build_index_ray

            index = build_index_ray(model_source, dataset_source, args.layer, address=args.ray or None,
                                    shard=shard, shards=shards, batch_size=args.batch_size, progress=bar,
                                    timings=timings)
        else:
            index = build_index(model, dataset, args.layer, shard=shard, shards=shards,
                                batch_size=args.batch_size, progress=bar, timings=timings)
        save(index, out)
        wall = time.perf_counter() - started
        print(f"indexed {index.count} of {n} images ({index.meta.get('skipped_count', '0')} skipped) in "
              f"{wall:.1f} s ({index.count / max(wall, 1e-9):.1f} images/s; decode {timings.decode_seconds:.1f} s, "
              f"model {timings.forward_seconds:.1f} s) -> {out}")
        return 0
    except (LookupError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # domain errors (unknown layer...) carry their message
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
