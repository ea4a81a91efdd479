"""One unit of the atlas, computed through the SDK: its feature visualisations (the default preset, and a
diverse set from one job with Lucid's diversity objective), its top dataset regions, its channel statistics
and the classes its top photos are predicted as. Images are written first, then the entry is returned for
the manifest."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image

from .._client import Client
from .._types import TopActivation, Unit
from ._plan import AtlasOptions, UnitKey


class ClassPredictor:
    """The model's top-1 class on each dataset photo, asked once per photo (Saliency's predictions: the
    photo as TopActivations returned it, box outline included) and shared by every unit of the build."""

    def __init__(self, client: Client, timeout: float) -> None:
        self.client, self.timeout = client, timeout
        self._cache: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()
        self.calls = 0

    def top1(self, model: str, entry: TopActivation) -> str | None:
        if entry.image is None:
            return None
        key = (model, entry.digest or entry.source)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        result = self.client.saliency(entry.image, model, overlay=False, outputs=["predictions"],
                                      timeout=self.timeout)
        label = result.predictions[0].label if result.predictions else None
        with self._lock:
            self.calls += 1
            if label is not None:
                self._cache[key] = label
        return label


def class_association(labels: list[str | None]) -> list[dict[str, Any]]:
    """The predicted classes of a unit's top photos, most frequent first (ties: the better-ranked first)."""
    counts = Counter(label for label in labels if label)
    first = {label: i for i, label in reversed(list(enumerate(labels))) if label}
    return [{"label": label, "count": n} for label, n in sorted(counts.items(), key=lambda kv: (-kv[1],
                                                                                                   first[kv[0]]))]


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
    top = client.top_activations(key.model, key.layer, c, k=options.top_k, dataset=options.dataset, crops=True,
                                 include_images=True, timeout=options.timeout)
    entries = []
    for i, item in enumerate(top):
        entries.append({
            "source": item.source, "score": item.score, "y": item.y, "x": item.x, "box": list(item.box),
            "crop": _save(item.crop, folder / f"{c}-top{i}.png") if item.crop is not None else None,
            "photo": _save(item.image, folder / f"{c}-photo{i}.png", photo=True) if item.image is not None
            else None,
        })
    labels = [predictor.top1(key.model, item) for item in top]
    stats = top.stats
    entry["top"] = entries
    entry["dataset"] = top.dataset or options.dataset
    entry["stats"] = None if stats is None else {"images": stats.images, "mean": stats.mean, "max": stats.max,
                                                 "positive_fraction": stats.positive_fraction}
    entry["dead"] = stats is not None and stats.max <= 0
    entry["classes"] = class_association(labels)
    return entry
