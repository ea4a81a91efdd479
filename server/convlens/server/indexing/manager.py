"""Indexes inside a server: read from --index-dir, or scanned once on the scheduler's workers and shared.

For a (model, dataset, layer) the first request finds, in order: the index in memory; the file for the
current key (weights digest, dataset digest, layer) in --index-dir (a restart reads it; no forward);
a build already running (it waits on that one: concurrent first requests share one scan); or it starts
the build. The scan submits batches of images as scheduler tasks, so it runs batched and fairly beside
every other RPC's work. A caller waits for a build only while its deadline allows and only for small
datasets; otherwise it gets FAILED_PRECONDITION saying how far the build is and how to build ahead.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from convlens.server.compute.top_activations import ScanPayload, compute_scan
from convlens.server.datasets.dataset import Dataset, DirectoryDataset
from convlens.server.datasets.registry import DatasetRegistry
from convlens.server.engine.topk.candidates import DEFAULT_PER_IMAGE, Candidates, concat
from convlens.server.engine.topk.index import (
    DEFAULT_K_MAX,
    ImageId,
    TopKIndex,
    from_candidates,
    merge,
)
from convlens.server.engine.topk.scan import empty_index
from convlens.server.errors import ConvLensError, FailedPrecondition
from convlens.server.indexing.build import layer_shape, prepare_one
from convlens.server.indexing.store import IndexKey, default_index_dir, load_if_valid, save, stamp, weights_digest
from convlens.server.metrics import Metrics
from convlens.server.models.model import ServedModel
from convlens.server.scheduler.scheduler import Scheduler
from convlens.server.scheduler.task import Task

log = logging.getLogger("convlens.index")
SCAN_RPC = "TopActivationsScan"  # the scheduler's (and its metrics') name for scan batches
# An index's state in a dataset's listing (ListDatasets): `indexes_of` lists the ready and building ones;
# "absent" is the contract's word for the rest (codecs/top_activations.py derives the enum table).
READY, BUILDING, ABSENT = "ready", "building", "absent"
INDEX_STATES = (READY, BUILDING, ABSENT)
MEMORY_SLOTS = 32  # indexes kept in memory (each O(channels x k_max))


async def scan(scheduler: Scheduler, model: ServedModel, layer: str, images: Sequence[torch.Tensor], per_image: int,
               deadline: float | None = None) -> Candidates:
    """The candidates of `images` (normalised [3, H, W]) at `layer`, in their order: one scheduler task each,
    so they are batched with every other scan's (an index build's or a caller's own images)."""
    tasks = [Task(model=model.name, rpc=SCAN_RPC, key=p.batch_key, payload=p, compute=compute_scan,
                  deadline=deadline, served=model)
             for p in (ScanPayload(layer, image, per_image) for image in images)]
    return concat(await asyncio.gather(*(scheduler.submit(t) for t in tasks)))


@dataclass
class Build:
    key: IndexKey
    total: int
    done: int = 0
    started: float = field(default_factory=time.monotonic)
    task: asyncio.Task[TopKIndex] | None = None

    def progress(self) -> str:
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return f"{self.done}/{self.total} images ({pct:.0f}%) after {time.monotonic() - self.started:.0f} s"


class IndexManager:
    def __init__(self, datasets: DatasetRegistry, scheduler: Scheduler, metrics: Metrics | None, index_dir: Path,
                 *, on_demand_images: int = 2000, chunk: int = 8, k_max: int = DEFAULT_K_MAX,
                 per_image: int = DEFAULT_PER_IMAGE, refresh_seconds: float = 30.0) -> None:
        self.datasets = datasets
        self.scheduler = scheduler
        self.metrics = metrics
        self.index_dir = Path(index_dir)
        self.on_demand_images = on_demand_images
        self.chunk = chunk
        self.k_max = k_max
        self.per_image = per_image
        self.refresh_seconds = refresh_seconds
        self._ready: OrderedDict[IndexKey, TopKIndex] = OrderedDict()
        self._builds: dict[IndexKey, Build] = {}
        self._refreshed: dict[str, float] = {}
        self._first_listings: dict[str, asyncio.Task[Any]] = {}  # folders listed in the background (ListDatasets)

    @classmethod
    def from_config(cls, config: Any, scheduler: Scheduler, metrics: Metrics | None) -> IndexManager:
        """The server's manager: its --dataset registry, --index-dir (or the default) and on-demand limit."""
        datasets = DatasetRegistry.from_specs(getattr(config, "datasets", ()) or ())
        index_dir = getattr(config, "index_dir", None) or default_index_dir()
        return cls(datasets, scheduler, metrics, index_dir,
                   on_demand_images=getattr(config, "index_on_demand_images", 2000))

    # ------------------------------------------------------------------ keys

    async def listing_of(self, dataset: Dataset):  # type: ignore[no-untyped-def]
        """The dataset's listing; a folder is re-listed (changed files re-hashed) every refresh_seconds."""
        now = time.monotonic()
        if isinstance(dataset, DirectoryDataset) and dataset.name in self._refreshed \
                and now - self._refreshed[dataset.name] >= self.refresh_seconds:
            self._refreshed[dataset.name] = now
            return await asyncio.to_thread(dataset.refresh)
        self._refreshed.setdefault(dataset.name, now)
        return await asyncio.to_thread(dataset.listing)

    async def known_listing(self, dataset: Dataset):  # type: ignore[no-untyped-def]
        """What ListDatasets says: the dataset's listing (as listing_of), except for a folder never listed
        before, whose listing (every file read and hashed: seconds for a large folder) is then made in the
        background while this answers at once with its image files' names (an empty digest: Dataset.glance)."""
        task = self._first_listings.get(dataset.name)
        if task is None and isinstance(dataset, DirectoryDataset) and dataset.known() is None:
            task = self._first_listings[dataset.name] = asyncio.get_running_loop().create_task(
                self.listing_of(dataset), name=f"convlens-list-{dataset.name}")
            task.add_done_callback(_retrieved)
        if task is not None and not task.done():
            return await asyncio.to_thread(dataset.glance)
        return await self.listing_of(dataset)

    async def key(self, model: ServedModel, dataset: Dataset, layer: str) -> IndexKey:
        listing = await self.listing_of(dataset)
        weights = await asyncio.to_thread(weights_digest, model.module)
        return IndexKey(model.name, weights, dataset.name, listing.digest, layer)

    # ------------------------------------------------------------------ the index of a key

    async def get(self, model: ServedModel, dataset: Dataset, layer: str, deadline: float | None) -> TopKIndex:
        layer_shape(model, layer)  # InvalidArgument before any work
        key = await self.key(model, dataset, layer)
        found = self._ready.get(key)
        if found is not None:
            self._ready.move_to_end(key)
            return found
        build = self._builds.get(key)
        if build is None:
            stored = await asyncio.to_thread(load_if_valid, key.path(self.index_dir), key)
            if stored is not None:
                self._remember(key, stored)
                if self.metrics is not None:
                    self.metrics.index_loads.labels(model.name, dataset.name, layer).inc()
                log.info("index %s/%s/%s read from %s", model.name, dataset.name, layer, key.path(self.index_dir))
                return stored
            # Re-checked after the await: a concurrent first request may have started the build meanwhile.
            build = self._builds.get(key) or self._start(model, dataset, layer, key)
        assert build.task is not None
        if build.total > self.on_demand_images:
            raise self._not_ready(build, f"the dataset has {build.total} images, more than the "
                                         f"{self.on_demand_images} indexed within a call")
        timeout = None if deadline is None else deadline - time.monotonic() - 0.05
        try:
            return await asyncio.wait_for(asyncio.shield(build.task), timeout)
        except TimeoutError:
            raise self._not_ready(build, "the call's deadline came first") from None

    def _not_ready(self, build: Build, why: str) -> FailedPrecondition:
        k = build.key
        return FailedPrecondition(
            f"the index of {k.model} / {k.dataset} / {k.layer} is being built: {build.progress()}; {why}. "
            f"Retry later, or build it ahead: `convlens index build {k.model} {k.dataset} {k.layer} "
            f"--index-dir {self.index_dir}` (add --shard I/N or --ray to spread it)", reason="INDEX_BUILDING")

    def _remember(self, key: IndexKey, index: TopKIndex) -> None:
        self._ready[key] = index
        self._ready.move_to_end(key)
        while len(self._ready) > MEMORY_SLOTS:
            self._ready.popitem(last=False)

    def _start(self, model: ServedModel, dataset: Dataset, layer: str, key: IndexKey) -> Build:
        images = dataset.listing().images
        build = Build(key, len(images))
        self._builds[key] = build
        build.task = asyncio.create_task(self._run(build, model, dataset, layer, images))
        build.task.add_done_callback(lambda t: t.cancelled() or t.exception())  # never "never retrieved"
        log.info("index %s/%s/%s: scanning %d images", model.name, dataset.name, layer, len(images))
        return build

    async def _run(self, build: Build, model: ServedModel, dataset: Dataset, layer: str,
                   images: list[ImageId]) -> TopKIndex:
        labels = (model.name, dataset.name, layer)
        index = empty_index(layer, layer_shape(model, layer), k_max=self.k_max, per_image=self.per_image)
        skipped = 0
        next_log = 0.1
        try:
            for start in range(0, len(images), self.chunk):
                ids = images[start:start + self.chunk]
                prepared = await asyncio.to_thread(_prepare_all, dataset, model, ids)
                ok = [(i, t) for i, t in zip(ids, prepared, strict=True) if t is not None]
                skipped += len(ids) - len(ok)
                if ok:
                    rows = await scan(self.scheduler, model, layer, [t for _, t in ok], self.per_image)
                    index = merge([index, from_candidates(index, [i for i, _ in ok], rows)])
                build.done = min(start + self.chunk, len(images))
                if self.metrics is not None:
                    self.metrics.index_images_scanned.labels(*labels).inc(len(ok))
                    self.metrics.index_build_progress.labels(*labels).set(build.done / max(build.total, 1))
                if build.done / max(build.total, 1) >= next_log:
                    log.info("index %s/%s/%s: %s", *labels, build.progress())
                    next_log += 0.1
            index.meta["skipped_count"] = str(skipped)
            index.meta["shard"] = "0/1"
            stamp(index, build.key)
            await asyncio.to_thread(save, index, build.key.path(self.index_dir))
            self._remember(build.key, index)
            if self.metrics is not None:
                self.metrics.index_builds.labels(*labels, "ok").inc()
            log.info("index %s/%s/%s built: %s, saved to %s", *labels, build.progress(),
                     build.key.path(self.index_dir))
            return index
        except BaseException as exc:
            if self.metrics is not None:
                self.metrics.index_builds.labels(*labels, "failed").inc()
            log.warning("index %s/%s/%s failed after %s: %s", *labels, build.progress(), exc)
            if isinstance(exc, ConvLensError | asyncio.CancelledError):
                raise
            raise FailedPrecondition(f"building the index of {'/'.join(labels)} failed: "
                                     f"{type(exc).__name__}: {exc}", reason="INDEX_BUILD_FAILED") from exc
        finally:
            self._builds.pop(build.key, None)

    # ------------------------------------------------------------------ what exists

    async def indexes_of(self, dataset: Dataset, models: list[ServedModel]) -> list[tuple[str, str, str, int, int]]:
        """(model, layer, state, done, total) for every ready or building index of the dataset."""
        listing = await self.listing_of(dataset)
        out = []
        for model in models:
            weights = await asyncio.to_thread(weights_digest, model.module)
            folder = IndexKey(model.name, weights, dataset.name, listing.digest, "").folder(self.index_dir)
            building = {b.key.layer: b for b in self._builds.values()
                        if (b.key.model, b.key.dataset, b.key.dataset_digest, b.key.weights)
                        == (model.name, dataset.name, listing.digest, weights)}
            ready = sorted(p.name.removesuffix(".npz") for p in folder.glob("*.npz") if ".shard-" not in p.name) \
                if folder.is_dir() else []
            out += [(model.name, layer, READY, 0, 0) for layer in ready if layer not in building]
            out += [(model.name, layer, BUILDING, b.done, b.total) for layer, b in sorted(building.items())]
        return out


def _retrieved(task: asyncio.Task[Any]) -> None:
    """A background listing's failure is logged here; the next call lists again and reports it."""
    if not task.cancelled() and task.exception() is not None:
        log.warning("listing %s failed: %s", task.get_name(), task.exception())


def _prepare_all(dataset: Dataset, model: ServedModel, ids: list[ImageId]) -> list[torch.Tensor | None]:
    out: list[torch.Tensor | None] = []
    for image in ids:
        try:
            out.append(prepare_one(dataset, model, image))
        except Exception as exc:  # unreadable: skipped and counted, not fatal
            log.warning("index scan: skipping %s/%s: %s", dataset.name, image.path, exc)
            out.append(None)
    return out
