"""TopActivations and ListDatasets: the dataset regions that most excite a unit, from a per-layer index.

A dataset query reads the (model, dataset, layer) index (indexing/manager.py: stored, shared, or scanned
on the scheduler), so after the first scan an answer costs a lookup plus, when asked, crops. The caller's
own images are ranked directly, without an index. Boxes come from the layer's receptive field (read off
the real graph) and are mapped back to the original image through the preprocessing geometry; crops are
cut from the original-resolution image, not from the 224-px model input.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image, ImageDraw

from convlens.server.datasets.dataset import Dataset
from convlens.server.engine.topk.candidates import DEFAULT_PER_IMAGE
from convlens.server.engine.topk.index import (
    DEFAULT_K_MAX,
    ChannelStats,
    Entry,
    ImageId,
    TopKIndex,
    from_candidates,
)
from convlens.server.engine.topk.scan import empty_index
from convlens.server.errors import Violations
from convlens.server.indexing.build import layer_shape
from convlens.server.indexing.manager import INDEX_STATES, IndexManager, scan
from convlens.server.models.model import ServedModel
from convlens.server.models.preprocess import Geometry, plan_geometry, prepare
from convlens.server.service.context import ServiceContext
from convlens.server.service.images import ImageInput, check_resized, to_array

RANKINGS = ("max", "mean")  # what a caller may rank by (the index also keeps "regions")
STATES = INDEX_STATES  # an index's state in a DatasetSummary (indexing/manager.py)
MAX_CALLER_IMAGES = 64
CROP_MAX_SIDE = 256  # crops larger than this (late layers see most of the photo) are downscaled
PICTURE_MAX_SIDE = 640
Box = tuple[int, int, int, int]
# What a TopActivations answer can carry (TopActivationsRequest.outputs); crops, images and photos imply the
# entries. "images" are the photos with the box drawn, "photos" the same without it.
OUTPUTS = ("entries", "crops", "images", "stats", "photos")
DEFAULT_OUTPUTS = frozenset({"entries", "stats"})


@dataclass
class TopActivationsQuery:
    model: str
    layer: str
    channel: int
    k: int = 9
    dataset: str = ""
    ranking: str = "max"
    max_per_image: int = 1
    images: list[ImageInput] = field(default_factory=list)
    crops: bool = False
    pictures: bool = False
    outputs: frozenset[str] | None = None  # None: DEFAULT_OUTPUTS; crops / pictures add theirs
    photos: bool = False  # set from outputs ("photos"): the original image without the box

    def wanted(self) -> frozenset[str]:
        wanted = set(DEFAULT_OUTPUTS if self.outputs is None else self.outputs)
        wanted |= {"crops"} if self.crops else set()
        wanted |= {"images"} if self.pictures else set()
        if wanted & {"crops", "images", "photos"}:
            wanted.add("entries")
        return frozenset(wanted)


@dataclass
class TopItem:
    image_index: int  # into the caller's images, -1 for a dataset image
    source: str
    digest: str
    score: float
    y: int
    x: int
    box: Box  # model-input pixels, clipped
    original_box: Box  # original-image pixels, clipped
    geometry: Geometry
    crop: Image.Image | None = None
    picture: Image.Image | None = None
    photo: Image.Image | None = None  # the original image fitted into PICTURE_MAX_SIDE, no box


@dataclass
class TopActivationsAnswer:
    items: list[TopItem]
    stats: ChannelStats
    images_scanned: int
    channels: int
    dataset: str
    outputs: frozenset[str] = DEFAULT_OUTPUTS  # what the answer carries: the codec encodes only these


@dataclass
class DatasetSummary:
    name: str
    description: str
    image_count: int
    skipped_count: int
    digest: str
    indexes: list[tuple[str, str, str, int, int]]  # (model, layer, state: one of STATES, done, total)


class TopActivationsService:
    def __init__(self, context: ServiceContext) -> None:
        cfg = context.config
        self.repository = context.repository
        self.scheduler = context.scheduler
        self.manager = IndexManager.from_config(cfg, self.scheduler, context.state.get("metrics"))
        self.datasets = self.manager.datasets

    # ------------------------------------------------------------------ TopActivations

    async def __call__(self, query: TopActivationsQuery, deadline: float | None) -> TopActivationsAnswer:
        model = self.repository.get(query.model)
        spec = model.layer(query.layer)
        shape = layer_shape(model, query.layer)
        channels = int(shape[0])
        validate(query, channels)
        wanted = query.wanted()
        query = replace(query, crops="crops" in wanted, pictures="images" in wanted, photos="photos" in wanted)
        entries_wanted = "entries" in wanted
        if query.images:
            index, originals, position = await self._rank_images(model, query, deadline)
            dataset_name = ""
            entries = (index.top(query.channel, query.k, ranking=query.ranking, max_per_image=query.max_per_image)
                       if entries_wanted else [])
            items = await asyncio.to_thread(
                lambda: [self._item(model, spec.receptive_field, e, originals[position[e.image]], position[e.image],
                                    query) for e in entries])
        else:
            dataset = self.datasets.get(query.dataset)
            index = await self.manager.get(model, dataset, query.layer, deadline)
            dataset_name = dataset.name
            entries = (index.top(query.channel, query.k, ranking=query.ranking, max_per_image=query.max_per_image)
                       if entries_wanted else [])
            items = await asyncio.to_thread(
                lambda: [self._dataset_item(model, spec.receptive_field, dataset, e, query) for e in entries])
        return TopActivationsAnswer(items, index.stats(query.channel), index.count, channels, dataset_name,
                                    outputs=wanted)

    async def _rank_images(self, model: ServedModel, query: TopActivationsQuery, deadline: float | None
                           ) -> tuple[TopKIndex, list[np.ndarray], dict[ImageId, int]]:
        """An index of the caller's images alone (no dataset, nothing stored), the decoded images, and each
        image id's position among the caller's images."""

        def load() -> tuple[list[np.ndarray], list]:  # type: ignore[type-arg]
            arrays = [to_array(img, f"images[{i}]") for i, img in enumerate(query.images)]
            for i, a in enumerate(arrays):
                check_resized(a.shape[0], a.shape[1], model, f"images[{i}]")  # issue #15: bounded memory
            return arrays, [prepare(a, model.preprocess)[0] for a in arrays]

        arrays, tensors = await asyncio.to_thread(load)
        ids = [ImageId(f"images[{i}]", hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:32])
               for i, a in enumerate(arrays)]
        index = empty_index(query.layer, model.layer(query.layer).output_shape, k_max=DEFAULT_K_MAX,
                            per_image=DEFAULT_PER_IMAGE)
        rows = await scan(self.scheduler, model, query.layer, tensors, DEFAULT_PER_IMAGE, deadline)
        return from_candidates(index, ids, rows), arrays, {image: i for i, image in enumerate(ids)}

    # ------------------------------------------------------------------ entries -> answers

    def _dataset_item(self, model: ServedModel, field_: object, dataset: Dataset, e: Entry,
                      query: TopActivationsQuery) -> TopItem:
        need_pixels = query.crops or query.pictures or query.photos
        original = dataset.read(e.image) if need_pixels else None
        size = original.shape[:2] if original is not None else dataset.size(e.image)
        return self._build(model, field_, e, size, original, -1, query)

    def _item(self, model: ServedModel, field_: object, e: Entry, original: np.ndarray, i: int,
              query: TopActivationsQuery) -> TopItem:
        return self._build(model, field_, e, original.shape[:2], original, i, query)

    @staticmethod
    def _build(model: ServedModel, field_: object, e: Entry, size: tuple[int, ...], original: np.ndarray | None,
               image_index: int, query: TopActivationsQuery) -> TopItem:
        h, w = int(size[0]), int(size[1])
        geo = plan_geometry(h, w, model.preprocess)
        box = input_box(field_, e.y, e.x, geo.input_height, geo.input_width)
        obox = original_box(geo, box)
        item = TopItem(image_index, e.image.path, e.image.digest, e.value, e.y, e.x, box, obox, geo)
        if original is not None:
            rgb = _rgb(original)
            if query.crops:
                item.crop = _fit(Image.fromarray(rgb[obox[1]:obox[3], obox[0]:obox[2]]), CROP_MAX_SIDE)
            if query.pictures:
                item.picture = draw_box(rgb, obox)
            if query.photos:
                item.photo = _fit(Image.fromarray(rgb), PICTURE_MAX_SIDE)
        return item

    # ------------------------------------------------------------------ ListDatasets

    async def list_datasets(self) -> list[DatasetSummary]:
        out = []
        for d in self.datasets.datasets():
            listing = await self.manager.known_listing(d)  # a folder's first call: its files, unhashed (no digest)
            indexes = await self.manager.indexes_of(d, self.repository.models()) if listing.digest else []
            out.append(DatasetSummary(d.name, d.description, len(listing.images), len(listing.skipped),
                                      listing.digest, indexes))
        return out


def validate(query: TopActivationsQuery, channels: int) -> None:
    """Every field's range, with the valid range in the message (INVALID_ARGUMENT naming every bad field)."""
    v = Violations()
    v.check(0 <= query.channel < channels, "channel", f"channel {query.channel} is out of range: layer "
            f"{query.layer!r} has {channels} channels (valid 0..{channels - 1})")
    v.check(1 <= query.k <= DEFAULT_K_MAX, "k", f"k {query.k} is out of range: valid 1..{DEFAULT_K_MAX}")
    v.check(query.ranking in RANKINGS, "ranking", f"ranking {query.ranking!r}: choose max or mean")
    v.check(1 <= query.max_per_image <= DEFAULT_PER_IMAGE, "max_per_image",
            f"max_per_image {query.max_per_image} is out of range: valid 1..{DEFAULT_PER_IMAGE}")
    v.check(len(query.images) <= MAX_CALLER_IMAGES, "images", f"{len(query.images)} images: at most "
            f"{MAX_CALLER_IMAGES} are ranked directly; put more in a dataset folder (--dataset NAME=DIR)")
    v.raise_if_any()


def input_box(field_: object, y: int, x: int, height: int, width: int) -> Box:
    """The receptive field of (y, x), clipped to the model input; the whole input when unknown."""
    box = getattr(field_, "box", None)
    if box is None:
        return (0, 0, width, height)
    x0, y0, x1, y1 = box(y, x)
    return (max(0, x0), max(0, y0), min(width, x1), min(height, y1))


def original_box(geo: Geometry, box: Box) -> Box:
    """An input box in original pixels, rounded outward (it still holds every pixel it covered), clipped."""
    x0, y0, x1, y1 = geo.to_original(box)
    return (max(0, math.floor(x0)), max(0, math.floor(y0)), min(geo.original_width, math.ceil(x1)),
            min(geo.original_height, math.ceil(y1)))


def draw_box(rgb: np.ndarray, box: Box) -> Image.Image:
    """The original image, fitted into PICTURE_MAX_SIDE, with the box drawn."""
    image = Image.fromarray(rgb)
    scale = min(1.0, PICTURE_MAX_SIDE / max(image.size))
    if scale < 1.0:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.LANCZOS, reducing_gap=2.0)
    draw = ImageDraw.Draw(image)
    x0, y0, x1, y1 = (v * scale for v in box)
    width = max(2, round(max(image.size) / 160))
    draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=(255, 214, 0), width=width)
    return image


def _fit(image: Image.Image, side: int) -> Image.Image:
    if max(image.size) <= side:
        return image
    s = side / max(image.size)
    return image.resize((max(1, round(image.width * s)), max(1, round(image.height * s))), Image.Resampling.LANCZOS,
                        reducing_gap=2.0)


def _rgb(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != np.uint8:
        a = np.clip(a, 0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return np.ascontiguousarray(a[:, :, :3])
