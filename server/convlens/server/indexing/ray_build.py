"""`convlens index build --ray`: the same scan as a Ray Data pipeline.

Files are read and preprocessed by parallel Ray tasks, one model actor per slot (a GPU each when the
cluster has GPUs, else a CPU each) runs `scan_batch` on each batch and returns the batch's partial index,
and the driver merges partials as they stream in (exact: top-k with stable ids is associative), so
the driver's memory stays O(channels x k_max) too. The result equals the single-process build.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from convlens.server.engine.topk import file_format
from convlens.server.engine.topk.candidates import DEFAULT_PER_IMAGE
from convlens.server.engine.topk.index import DEFAULT_K_MAX, ImageId, TopKIndex, merge
from convlens.server.engine.topk.scan import empty_index, scan_batch
from convlens.server.indexing.build import Progress, Timings, index_key, layer_shape, prepare_one, shard_of
from convlens.server.indexing.sources import DatasetSource, ModelSource
from convlens.server.indexing.store import stamp

log = logging.getLogger("convlens.index")


class _Decode:
    """Ray Data UDF (one per task process): paths -> preprocessed model inputs."""

    def __init__(self, model: ModelSource, dataset: DatasetSource) -> None:
        import torch

        torch.set_num_threads(1)  # one decode per CPU slot; resizing needs no thread team
        self.model = model.load()
        self.dataset = dataset.load()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        h, w = self.model.preprocess.height, self.model.preprocess.width
        pixels = np.zeros((len(batch["path"]), 3, h, w), np.float32)
        ok = np.zeros(len(batch["path"]), bool)
        for i, (path, digest) in enumerate(zip(batch["path"], batch["digest"], strict=True)):
            try:  # an unreadable file stays in the batch, flagged, so it is counted as skipped
                pixels[i] = prepare_one(self.dataset, self.model, ImageId(str(path), str(digest))).numpy()
                ok[i] = True
            except Exception as exc:
                log.warning("skipping %s: %s", path, exc)
        return {"path": batch["path"], "digest": batch["digest"], "ok": ok, "pixels": pixels}


class _Scan:
    """Ray Data actor: holds one model replica, turns each batch into its partial index (bytes)."""

    def __init__(self, model: ModelSource, layer: str, k_max: int, per_image: int, channels_last: bool) -> None:
        import torch

        torch.set_num_threads(1)
        self.model = model.load()
        if torch.cuda.is_available():
            self.model = self.model.replica(torch.device("cuda"))
        self.layer = layer
        self.like = empty_index(layer, layer_shape(self.model, layer), k_max=k_max, per_image=per_image)
        self.channels_last = channels_last

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        ok = np.asarray(batch["ok"], bool)
        ids = [ImageId(str(p), str(d)) for p, d, good in zip(batch["path"], batch["digest"], ok, strict=True)
               if good]
        skipped = int((~ok).sum())
        if not ids:
            return {"index": np.array([b""], dtype=object), "skipped": np.array([skipped])}
        inputs = torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok])).to(self.model.device)
        part = scan_batch(self.model.module, self.layer, inputs, ids, self.like, channels_last=self.channels_last)
        return {"index": np.array([file_format.to_bytes(part)], dtype=object), "skipped": np.array([skipped])}


def build_index_ray(model: ModelSource, dataset: DatasetSource, layer: str, *, address: str | None = None,
                    shard: int = 0, shards: int = 1, batch_size: int = 8, k_max: int = DEFAULT_K_MAX,
                    per_image: int = DEFAULT_PER_IMAGE, channels_last: bool = True, actors: int | None = None,
                    progress: Progress | None = None, timings: Timings | None = None) -> TopKIndex:
    """The index of one shard (all of the dataset by default), built on a Ray cluster."""
    import ray

    served, data = model.load(), dataset.load()
    key = index_key(served, data, layer)
    images = shard_of(data.listing().images, shard, shards)
    index = empty_index(layer, layer_shape(served, layer), k_max=k_max, per_image=per_image)
    if not ray.is_initialized():
        ray.init(address=address or None, log_to_driver=False, configure_logging=False)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    slots = actors or max(1, gpus or int(ray.cluster_resources().get("CPU", 1)) // 2)
    started = time.perf_counter()
    items = [{"path": i.path, "digest": i.digest} for i in images]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), slots * 4)))
    ds = ds.map_batches(_Decode, fn_constructor_args=(model, dataset), batch_size=batch_size, concurrency=slots,
                        num_cpus=1)
    ds = ds.map_batches(_Scan, fn_constructor_args=(model, layer, k_max, per_image, channels_last),
                        batch_size=batch_size, concurrency=slots, num_gpus=1 if gpus else 0,
                        num_cpus=0 if gpus else 1)
    done, skipped = 0, 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        parts = [file_format.from_bytes(b) for b in batch["index"] if b]
        skipped += int(np.sum(batch["skipped"]))
        if parts:
            index = merge([index, *parts])
        done = index.count + skipped
        if progress is not None:
            progress(done, len(images))
    index.meta["skipped_count"] = str(skipped)
    index.meta["shard"] = f"{shard}/{shards}"
    if timings is not None:
        timings.forward_seconds = time.perf_counter() - started  # the whole pipeline: decode overlaps scan
        timings.images = done
    return stamp(index, key)
