"""A per-channel top-k index of a layer's activations over a dataset, mergeable exactly.

For every channel of one layer it keeps the `k_max` best entries (value, image, y, x) under three
rankings, plus summary statistics:

- "max":     one entry per image, its spatial max (first position in row-major order on ties);
- "mean":    one entry per image, its spatial mean (positioned at the spatial argmax, for the box);
- "regions": up to `per_image` entries per image, its strongest local maxima (3x3 peaks), so one
             photo can contribute several distinct regions.

Entries are totally ordered by (value desc, image id asc, y asc, x asc), with image ids that are
stable across processes (dataset-relative path + content digest). A top-k under a total order is
associative and commutative, so merging the indexes of any split of a dataset into shards gives exactly
the index of one pass. The statistics merge exactly too: counts are integers, maxima are maxima, and the
per-image means are rounded to multiples of 2**-20 before they are summed in float64, so every partial
sum is exact (while |sum| < 2**33) and the order of additions does not matter.

Memory is O(channels x k_max) whatever the dataset size: only the ids of images that some channel still
holds are kept. Which images were scanned is summarised by a count and an order-independent digest
(`coverage`), so a complete index can be told from a partial one without listing the images.
Pure numpy: candidates.py turns a batch of activations into what `add` folds in; file_format.py
saves and loads it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from convlens.server.engine.topk.candidates import DEFAULT_PER_IMAGE, Candidates

RANKINGS = ("max", "mean", "regions")
DEFAULT_K_MAX = 64
MEAN_QUANTUM = 2.0 ** -20  # per-image means are summed on this grid: exact, order-free float64 sums
_COVERAGE_MOD = 1 << 128


@dataclass(frozen=True, order=True)
class ImageId:
    """A dataset image, independent of loader order: its dataset-relative path and a content digest."""

    path: str
    digest: str

    def token(self) -> int:
        """A 128-bit number for the order-independent coverage digest."""
        return int.from_bytes(hashlib.sha256(f"{self.path}\0{self.digest}".encode()).digest()[:16], "big")


def coverage_of(ids: Iterable[ImageId]) -> int:
    """The coverage digest of a set of images (what an index that scanned exactly them reports)."""
    return sum(i.token() for i in ids) % _COVERAGE_MOD


@dataclass(frozen=True)
class Entry:
    value: float
    image: ImageId
    y: int
    x: int


@dataclass(frozen=True)
class ChannelStats:
    images: int
    mean: float  # mean activation over every position of every image
    max: float
    positive_fraction: float  # fraction of positions > 0 (0 for a unit dead on this dataset)


@dataclass
class Table:
    """One ranking: [C, K] arrays, best first; unused slots hold value -inf and image -1."""

    values: np.ndarray  # float32
    images: np.ndarray  # int32, index into TopKIndex.images
    ys: np.ndarray  # int32
    xs: np.ndarray  # int32

    @classmethod
    def empty(cls, channels: int, k: int) -> Table:
        return cls(np.full((channels, k), -np.inf, np.float32), np.full((channels, k), -1, np.int32),
                   np.full((channels, k), -1, np.int32), np.full((channels, k), -1, np.int32))

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return self.values, self.images, self.ys, self.xs


@dataclass
class TopKIndex:
    layer: str
    channels: int
    map_hw: tuple[int, int]  # (1, 1) for a vector layer (logits)
    k_max: int = DEFAULT_K_MAX
    per_image: int = DEFAULT_PER_IMAGE
    images: list[ImageId] = field(default_factory=list)  # sorted; only those some table references
    tables: dict[str, Table] = field(default_factory=dict)
    count: int = 0  # images scanned
    coverage: int = 0
    # Per channel; empty arrays are allocated for `channels` in __post_init__.
    sum_mean: np.ndarray = field(default_factory=lambda: np.zeros(0))  # float64, sum of quantised image means
    max: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # float32
    positive: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # int64, positions > 0
    meta: dict[str, str] = field(default_factory=dict)  # free-form provenance (model, digests, ...)

    def __post_init__(self) -> None:
        if self.k_max < 1 or self.per_image < 1:
            raise ValueError("k_max and per_image must be >= 1")
        for name in RANKINGS:
            self.tables.setdefault(name, Table.empty(self.channels, self.k_max))
        if self.sum_mean.size == 0:
            self.sum_mean = np.zeros(self.channels, np.float64)
        if self.max.size == 0:
            self.max = np.full(self.channels, -np.inf, np.float32)
        if self.positive.size == 0:
            self.positive = np.zeros(self.channels, np.int64)

    # ------------------------------------------------------------------ building

    @classmethod
    def like(cls, other: TopKIndex) -> TopKIndex:
        return cls(other.layer, other.channels, other.map_hw, other.k_max, other.per_image,
                   meta=dict(other.meta))

    def add(self, ids: Sequence[ImageId], batch: Candidates) -> None:
        """Fold one scanned batch into the index (in place)."""
        part = from_candidates(self, ids, batch)
        merged = merge([self, part])
        self.__dict__.update(merged.__dict__)

    # ------------------------------------------------------------------ querying

    def top(self, channel: int, k: int, *, ranking: str = "max", max_per_image: int = 1) -> list[Entry]:
        """The best k entries of a channel, at most `max_per_image` per image, best first.

        From the "regions" table when more than one region per image is allowed; that table holds the
        top k_max under a cap of `per_image`, so a greedy pass under a smaller cap is a prefix of the
        exact answer (it may hold fewer than k entries when a few images dominate the channel).
        """
        if ranking not in ("max", "mean"):
            raise ValueError(f"ranking must be max or mean, got {ranking!r}")
        name = "regions" if ranking == "max" and max_per_image > 1 else ranking
        t = self.tables[name]
        out: list[Entry] = []
        taken: dict[int, int] = {}
        for v, img, y, x in zip(t.values[channel], t.images[channel], t.ys[channel], t.xs[channel],
                                strict=True):
            if img < 0 or len(out) >= k:
                break
            if taken.get(int(img), 0) >= max_per_image:
                continue
            taken[int(img)] = taken.get(int(img), 0) + 1
            out.append(Entry(float(v), self.images[int(img)], int(y), int(x)))
        return out

    def stats(self, channel: int) -> ChannelStats:
        if self.count == 0:
            return ChannelStats(0, 0.0, 0.0, 0.0)
        positions = self.count * self.map_hw[0] * self.map_hw[1]
        return ChannelStats(self.count, float(self.sum_mean[channel] / self.count), float(self.max[channel]),
                            float(self.positive[channel] / positions))

    def same_as(self, other: TopKIndex) -> bool:
        """Exactly equal content (entries, ids, statistics, coverage)."""
        if (self.layer, self.channels, self.map_hw, self.k_max, self.per_image, self.count, self.coverage) != \
                (other.layer, other.channels, other.map_hw, other.k_max, other.per_image, other.count,
                 other.coverage) or self.images != other.images:
            return False
        for name in RANKINGS:
            for a, b in zip(self.tables[name].arrays(), other.tables[name].arrays(), strict=True):
                if not np.array_equal(a, b):
                    return False
        return all(np.array_equal(getattr(self, n), getattr(other, n)) for n in ("sum_mean", "max", "positive"))

    def matches(self, other: TopKIndex, *, rtol: float = 1e-5, atol: float = 1e-5) -> bool:
        """Same entries (images, positions, order), counts and coverage; values equal up to float rounding.

        What two builders that batch differently agree on: a forward pass at batch size 1 and at 8 (or in
        another layout or process) may differ in the last bits, never in which image holds which rank.
        """
        if (self.layer, self.channels, self.map_hw, self.k_max, self.per_image, self.count, self.coverage) != \
                (other.layer, other.channels, other.map_hw, other.k_max, other.per_image, other.count,
                 other.coverage) or self.images != other.images:
            return False
        for name in RANKINGS:
            a, b = self.tables[name], other.tables[name]
            if not all(np.array_equal(x, y) for x, y in ((a.images, b.images), (a.ys, b.ys), (a.xs, b.xs))):
                return False
            if not np.allclose(a.values, b.values, rtol=rtol, atol=atol, equal_nan=True):
                return False
        return (np.array_equal(self.positive, other.positive)
                and np.allclose(self.sum_mean, other.sum_mean, rtol=rtol, atol=atol * max(self.count, 1))
                and np.allclose(self.max, other.max, rtol=rtol, atol=atol))



def from_candidates(shape_of: TopKIndex, ids: Sequence[ImageId], batch: Candidates) -> TopKIndex:
    """A small index holding one batch (same layer and sizes as `shape_of`)."""
    b, c = batch.max_value.shape
    if b != len(ids) or c != shape_of.channels:
        raise ValueError(f"batch of {b} images x {c} channels for {len(ids)} ids and "
                         f"{shape_of.channels} channels")
    if len(set(ids)) != len(ids):
        raise ValueError("an image appears twice in one batch")
    w = shape_of.map_hw[1]
    order = sorted(range(b), key=lambda i: ids[i])
    rank = np.empty(b, np.int32)
    rank[order] = np.arange(b, dtype=np.int32)
    part = TopKIndex.like(shape_of)
    part.images = [ids[i] for i in order]
    img = np.broadcast_to(rank[:, None], (b, c))

    def table(values: np.ndarray, pos: np.ndarray, imgs: np.ndarray) -> Table:
        # [B, C, ...] candidates -> [C, B*...] rows, then the per-channel top k_max.
        v = np.moveaxis(values, 0, 1).reshape(c, -1).astype(np.float32)
        p = np.moveaxis(pos, 0, 1).reshape(c, -1)
        i = np.moveaxis(imgs, 0, 1).reshape(c, -1).astype(np.int32)
        t = Table(v, i, (p // w).astype(np.int32), (p % w).astype(np.int32))
        return _top(_canonical(t), shape_of.k_max)

    part.tables = {
        "max": table(batch.max_value, batch.max_pos, img),
        "mean": table(batch.mean_value, batch.max_pos, img),
        "regions": table(batch.region_value, batch.region_pos,
                         np.broadcast_to(rank[:, None, None], batch.region_value.shape)),
    }
    means = np.nan_to_num(batch.mean_value.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    part.sum_mean = (np.round(means / MEAN_QUANTUM) * MEAN_QUANTUM).sum(axis=0)
    part.max = batch.max_value.max(axis=0).astype(np.float32)
    part.positive = batch.positive.sum(axis=0).astype(np.int64)
    part.count = b
    part.coverage = coverage_of(ids)
    return _compact(part)


# ---------------------------------------------------------------------- merging

def merge(parts: Sequence[TopKIndex]) -> TopKIndex:
    """The index of the union of the parts' (disjoint) image sets; exact and order-independent."""
    if not parts:
        raise ValueError("nothing to merge")
    first = parts[0]
    for p in parts[1:]:
        if (p.layer, p.channels, p.map_hw, p.k_max, p.per_image) != \
                (first.layer, first.channels, first.map_hw, first.k_max, first.per_image):
            raise ValueError(f"cannot merge indexes of different shapes: {p.layer} {p.channels}x{p.map_hw} "
                             f"k={p.k_max}/{p.per_image} vs {first.layer} {first.channels}x{first.map_hw} "
                             f"k={first.k_max}/{first.per_image}")
    out = TopKIndex.like(first)
    out.images = sorted(set().union(*(p.images for p in parts)))
    where = {img: i for i, img in enumerate(out.images)}
    for name in RANKINGS:
        pieces = []
        for p in parts:
            remap = np.array([where[i] for i in p.images] + [-1], np.int32)  # -1 stays -1
            t = p.tables[name]
            pieces.append(Table(t.values, remap[t.images], t.ys, t.xs))
        joined = Table(*(np.concatenate(a, axis=1) for a in zip(*(t.arrays() for t in pieces), strict=True)))
        out.tables[name] = _top(joined, first.k_max)
    out.count = sum(p.count for p in parts)
    out.coverage = sum(p.coverage for p in parts) % _COVERAGE_MOD
    out.sum_mean = np.sum([p.sum_mean for p in parts], axis=0)
    out.max = np.max([p.max for p in parts], axis=0).astype(np.float32)
    out.positive = np.sum([p.positive for p in parts], axis=0).astype(np.int64)
    return _compact(out)


def _canonical(t: Table) -> Table:
    """Slots that hold nothing (value -inf) all look alike, so they sort alike."""
    empty = ~(t.values > -np.inf)
    return Table(np.where(empty, -np.inf, t.values).astype(np.float32), np.where(empty, -1, t.images),
                 np.where(empty, -1, t.ys), np.where(empty, -1, t.xs))


def _top(t: Table, k: int) -> Table:
    """Per row: sort by (value desc, image asc, y asc, x asc), empty slots last; keep k columns."""
    empty = t.images < 0
    # Images are indices into a sorted id list, so comparing indices compares ids.
    order = np.lexsort((t.xs, t.ys, np.where(empty, np.iinfo(np.int32).max, t.images), -t.values.astype(np.float64),
                        empty), axis=-1)[:, :k]
    picked = Table(*(np.take_along_axis(a, order, axis=1) for a in t.arrays()))
    if picked.values.shape[1] < k:  # fewer candidates than k: pad with empty slots
        pad = Table.empty(t.values.shape[0], k - picked.values.shape[1])
        picked = Table(*(np.concatenate(ab, axis=1) for ab in zip(picked.arrays(), pad.arrays(), strict=True)))
    return picked


def _compact(index: TopKIndex) -> TopKIndex:
    """Drop the ids no table references any more (memory stays O(C x k_max))."""
    used = np.unique(np.concatenate([index.tables[n].images.ravel() for n in RANKINGS]))
    used = used[used >= 0]
    if len(used) == len(index.images):
        return index
    remap = np.full(len(index.images) + 1, -1, np.int32)
    remap[used] = np.arange(len(used), dtype=np.int32)
    index.images = [index.images[i] for i in used]
    for name in RANKINGS:
        t = index.tables[name]
        index.tables[name] = Table(t.values, remap[t.images], t.ys, t.xs)
    return index
