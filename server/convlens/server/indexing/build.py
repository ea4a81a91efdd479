"""Building an index ahead of time in one process: `convlens index build` and each Kubernetes shard.

Images are decoded and preprocessed on a small thread pool one batch ahead of the model, exactly as
classification prepares them; the model part is `engine.topk.scan.scan_batch` (as on the Ray actors; the
server's scheduler runs its `scan_candidates` step). Decode and forward time are measured separately.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from convlens.server.datasets.dataset import Dataset
from convlens.server.engine.topk import file_format
from convlens.server.engine.topk.candidates import DEFAULT_PER_IMAGE
from convlens.server.engine.topk.index import DEFAULT_K_MAX, ImageId, TopKIndex, merge
from convlens.server.engine.topk.scan import empty_index, scan_batch
from convlens.server.errors import InvalidArgument
from convlens.server.indexing.store import IndexKey, load_if_valid, save, stamp, weights_digest
from convlens.server.models.model import ServedModel
from convlens.server.models.preprocess import prepare

log = logging.getLogger("convlens.index")
Progress = Callable[[int, int], None]  # (images done, images total)


@dataclass
class Timings:
    decode_seconds: float = 0.0  # read + decode + resize/crop/normalise (summed over threads)
    forward_seconds: float = 0.0  # model to the layer + candidates + merge
    images: int = 0
    skipped: dict[str, str] = field(default_factory=dict)


def layer_shape(model: ServedModel, layer: str) -> tuple[int, ...]:
    spec = model.layer(layer)
    if len(spec.output_shape) not in (1, 3):
        raise InvalidArgument(
            f"layer {layer!r} of {model.name!r} has output shape {spec.output_shape or 'none (it does not run)'}"
            "; choose a layer with a (C, H, W) map or a vector output (`convlens layers MODEL`)", field="layer")
    return spec.output_shape


def index_key(model: ServedModel, dataset: Dataset, layer: str) -> IndexKey:
    return IndexKey(model.name, weights_digest(model.module), dataset.name, dataset.listing().digest, layer)


def shard_of(images: Sequence[ImageId], shard: int, shards: int) -> list[ImageId]:
    """Round-robin over the sorted ids: every image in exactly one shard, same split in every process."""
    if shards < 1 or not 0 <= shard < shards:
        raise ValueError(f"shard {shard} of {shards}: need 0 <= shard < shards")
    return list(images[shard::shards])


def prepare_one(dataset: Dataset, model: ServedModel, image: ImageId) -> torch.Tensor:
    tensor, _ = prepare(dataset.read(image), model.preprocess)
    return tensor


def _batches(dataset: Dataset, model: ServedModel, images: list[ImageId], batch_size: int,
             timings: Timings, pool: ThreadPoolExecutor
             ) -> Iterator[tuple[list[ImageId], torch.Tensor | None]]:
    def load(image: ImageId) -> tuple[ImageId, torch.Tensor | None, float, str]:
        started = time.perf_counter()
        try:
            return image, prepare_one(dataset, model, image), time.perf_counter() - started, ""
        except Exception as exc:  # unreadable: skipped, counted, reported
            return image, None, time.perf_counter() - started, f"{type(exc).__name__}: {exc}"

    chunks = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
    pending = [pool.map(load, c) for c in chunks[:2]]  # one batch decoding ahead of the model
    for n in range(len(chunks)):
        results = list(pending[n])
        if n + 2 < len(chunks):
            pending.append(pool.map(load, chunks[n + 2]))
        ids, tensors = [], []
        for image, tensor, seconds, error in results:
            timings.decode_seconds += seconds
            if tensor is None:
                timings.skipped[image.path] = error
                log.warning("skipping %s: %s", image.path, error)
            else:
                ids.append(image)
                tensors.append(tensor)
        yield ids, torch.stack(tensors) if tensors else None


def build_index(model: ServedModel, dataset: Dataset, layer: str, *, shard: int = 0, shards: int = 1,
                batch_size: int = 8, k_max: int = DEFAULT_K_MAX, per_image: int = DEFAULT_PER_IMAGE,
                channels_last: bool = True, progress: Progress | None = None, decode_threads: int = 2,
                timings: Timings | None = None) -> TopKIndex:
    """The index of one shard (all of the dataset by default), stamped with its key."""
    key = index_key(model, dataset, layer)
    if channels_last and model.device.type == "cpu":
        # Weights and input in channels_last: 1.2-1.4x the contiguous forward on this CPU (bench_top).
        model = model.replica(model.device, torch.channels_last)
    images = shard_of(dataset.listing().images, shard, shards)
    index = empty_index(layer, layer_shape(model, layer), k_max=k_max, per_image=per_image)
    timings = timings if timings is not None else Timings()
    done = 0
    with ThreadPoolExecutor(decode_threads, thread_name_prefix="convlens-decode") as pool:
        for ids, inputs in _batches(dataset, model, images, batch_size, timings, pool):
            if inputs is not None:
                started = time.perf_counter()
                part = scan_batch(model.module, layer, inputs.to(model.device), ids, index,
                                  channels_last=channels_last)
                index = merge([index, part])
                timings.forward_seconds += time.perf_counter() - started
            done += batch_size
            timings.images = min(done, len(images))
            if progress is not None:
                progress(timings.images, len(images))
    index.meta["skipped_count"] = str(len(timings.skipped))
    index.meta["shard"] = f"{shard}/{shards}"
    return stamp(index, key)


def merge_shards(paths: Sequence[Path]) -> TopKIndex:
    """Merge shard files of one key; refuses mixed keys and a missing or doubled shard."""
    parts = [file_format.load(p) for p in paths]
    if not parts:
        raise ValueError("no shard files to merge")
    keys = {p.meta.get("key") for p in parts}
    if len(keys) != 1:
        raise ValueError(f"shards of different models, datasets or layers: {sorted(map(str, keys))}")
    shards = sorted(p.meta.get("shard", "?") for p in parts)
    totals = {s.partition("/")[2] for s in shards}
    if len(totals) != 1 or sorted(int(s.partition("/")[0]) for s in shards) != list(range(int(totals.pop()))):
        raise ValueError(f"need every shard exactly once, got {', '.join(shards)}")
    merged = merge(parts)
    merged.meta = {k: v for k, v in parts[0].meta.items() if k != "shard"}
    merged.meta["skipped_count"] = str(sum(int(p.meta.get("skipped_count", "0")) for p in parts))
    return merged


def cached_or_build(model: ServedModel, dataset: Dataset, layer: str, root: Path, **kwargs: object) -> TopKIndex:
    """The stored index for the current key, or a fresh single-process build saved beside it."""
    key = index_key(model, dataset, layer)
    found = load_if_valid(key.path(root), key)
    if found is not None:
        return found
    index = build_index(model, dataset, layer, **kwargs)  # type: ignore[arg-type]
    save(index, key.path(root))
    return index


__all__ = ["Timings", "build_index", "cached_or_build", "index_key", "layer_shape", "merge_shards", "shard_of",
           "prepare_one"]
