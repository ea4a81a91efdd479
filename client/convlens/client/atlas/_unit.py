"""One unit of the atlas, computed through the SDK: its feature visualisations (the default preset, and a
diverse set from one job with Lucid's diversity objective), its top dataset regions, its channel statistics
and the classes its top photos are predicted as. Images are written first, then the entry is returned for
the manifest."""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from PIL import Image

from .._client import Client
from .._types import Prediction, TopActivation, Unit
from ._photo import draw_region, photo_box
from ._plan import AtlasOptions, UnitKey

# What a unit asks TopActivations for: the photos come without the box (the atlas draws it, _photo.py)
# so the class of a photo is predicted on the photo itself, not on one unit's boxed copy of it.
TOP_OUTPUTS = ("entries", "stats", "crops", "photos")


class ClassPredictor:
    """The model's top-1 class on each dataset photo as it is (no box drawn: TopActivations' "photos"),
    asked through Saliency (predictions only) once per photo however many units' top lists hold it and
    however many threads ask at once (the first asker's call is a future the others wait on); shared by
    every unit of a build."""

    def __init__(self, client: Client, timeout: float) -> None:
        self.client, self.timeout = client, timeout
        self._asked: dict[tuple[str, str, str], Future[Prediction | None]] = {}
        self._lock = threading.Lock()
        self.calls = 0  # Saliency calls made

    def predict(self, model: str, entry: TopActivation) -> Prediction | None:
        if entry.photo is None:
            return None
        key = (model, entry.source, entry.digest)
        with self._lock:
            future = self._asked.get(key)
            mine = future is None
            if future is None:
                future = self._asked[key] = Future()
                self.calls += 1
        if mine:
            try:
                result = self.client.saliency(entry.photo, model, overlay=False, outputs=["predictions"],
                                              timeout=self.timeout)
            except BaseException as exc:
                with self._lock:
                    del self._asked[key]  # not remembered: a later unit asks again
                future.set_exception(exc)
                raise
            future.set_result(result.predictions[0] if result.predictions else None)
        return future.result()


def class_association(predictions: list[Prediction | None]) -> list[dict[str, Any]]:
    """The top-1 classes of a unit's top photos, most frequent first (ties: the better-ranked first), each
    with how many photos and their mean top-1 probability."""
    labels = [p.label if p is not None else None for p in predictions]
    counts = Counter(label for label in labels if label)
    first = {label: i for i, label in reversed(list(enumerate(labels))) if label}
    mass: dict[str, float] = {}
    for p in predictions:
        if p is not None and p.label:
            mass[p.label] = mass.get(p.label, 0.0) + p.probability
    return [{"label": label, "count": n, "probability": mass[label] / n}
            for label, n in sorted(counts.items(), key=lambda kv: (-kv[1], first[kv[0]]))]


def _save(image: Image.Image, path: Path, *, photo: bool = False) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    if photo:  # photos are large and photographic: JPEG keeps the atlas small
        path = path.with_suffix(".jpg")
        image.convert("RGB").save(path, quality=85)
    else:
        image.save(path)
    return path.name


def compute_unit(client: Client, key: UnitKey, options: AtlasOptions, predictor: ClassPredictor,
                 root: Path) -> dict[str, Any]:
    unit = Unit(key.layer, key.channel)
    folder = root / key.image_dir()
    c = key.channel
    common: dict[str, Any] = {"steps": options.steps, "size": options.size, "seed": options.seed + c}
    fv = client.maximize_unit(key.model, unit, timeout=options.timeout, **common)
    entry: dict[str, Any] = {
        "model": key.model, "layer": key.layer, "channel": c,
        "fv": {"file": _save(fv.image, folder / f"{c}-fv.png"), "objective": fv.objective,
               "predictions": [p.label for p in fv.predictions[:3]]},
    }
    if options.diverse_images >= 2:
        div = client.maximize_unit(key.model, unit, timeout=options.timeout, images=options.diverse_images,
                                   diversity=options.diversity, **common)
        entry["diverse"] = {
            "files": [_save(item.image, folder / f"{c}-div{i}.png") for i, item in enumerate(div.images)],
            "objectives": [item.objective for item in div.images],
            "gram_similarity": div.gram_similarity, "weight": options.diversity,
        }
    top = client.top_activations(key.model, key.layer, c, k=options.top_k, dataset=options.dataset,
                                 outputs=TOP_OUTPUTS, timeout=options.timeout)
    predictions = [predictor.predict(key.model, item) for item in top]
    entries = []
    for i, (item, predicted) in enumerate(zip(top, predictions, strict=True)):
        photo = None
        if item.photo is not None:
            boxed = draw_region(item.photo, photo_box(item.photo.size, item.original_box, item.geometry))
            photo = _save(boxed, folder / f"{c}-photo{i}.png", photo=True)
        entries.append({
            "source": item.source, "score": item.score, "y": item.y, "x": item.x, "box": list(item.box),
            "crop": _save(item.crop, folder / f"{c}-top{i}.png") if item.crop is not None else None,
            "photo": photo,
            "label": predicted.label if predicted is not None else None,
            "probability": predicted.probability if predicted is not None else None,
        })
    stats = top.stats
    entry["top"] = entries
    entry["dataset"] = top.dataset or options.dataset
    entry["stats"] = None if stats is None else {"images": stats.images, "mean": stats.mean, "max": stats.max,
                                                 "positive_fraction": stats.positive_fraction}
    entry["dead"] = stats is not None and stats.max <= 0
    entry["classes"] = class_association(predictions)
    return entry
