"""A dataset is a sorted list of stable image ids plus a way to read each image at full resolution.

Ids are (dataset-relative path, content digest), never a loader position, so shards built in different
processes name the same image the same way. The dataset digest covers every id, so an index keyed by it
is rebuilt when any file's content changes (not when a timestamp does).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from convlens.server.engine.topk.index import ImageId

log = logging.getLogger("convlens.datasets")

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


@dataclass(frozen=True)
class Listing:
    images: list[ImageId]  # sorted
    skipped: dict[str, str]  # relative path -> why it is not part of the dataset
    digest: str  # hex; changes when any image's path or content does

    @classmethod
    def of(cls, images: list[ImageId], skipped: dict[str, str]) -> Listing:
        images = sorted(images)
        h = hashlib.sha256()
        for i in images:
            h.update(f"{i.path}\0{i.digest}\n".encode())
        return cls(images, skipped, h.hexdigest())


class Dataset:
    """Base: `listing()` (cached, thread-safe), `read(id)` -> HxWx3 uint8 RGB at original resolution."""

    def __init__(self, name: str, description: str) -> None:
        self.name = name
        self.description = description
        self._lock = threading.Lock()
        self._listing: Listing | None = None

    def listing(self) -> Listing:
        with self._lock:
            if self._listing is None:
                started = time.monotonic()
                self._listing = self._list()
                log.info("dataset %s: %d images, %d skipped, digest %s (%.1f s)", self.name,
                         len(self._listing.images), len(self._listing.skipped), self._listing.digest[:12],
                         time.monotonic() - started)
            return self._listing

    def known(self) -> Listing | None:
        """The listing if one was made (None: not yet), without making one."""
        return self._listing

    def glance(self) -> Listing:
        """What can be said at once, reading no image (a folder: its image files' names, see there)."""
        return self.listing()

    def refresh(self) -> Listing:
        """List again (contents may have changed); unchanged files are not re-hashed where possible."""
        with self._lock:
            self._listing = None
        return self.listing()

    def _list(self) -> Listing:
        raise NotImplementedError

    def read(self, image: ImageId) -> np.ndarray:
        raise NotImplementedError

    def size(self, image: ImageId) -> tuple[int, int]:
        """(height, width) of `read(image)`, without decoding the pixels where possible."""
        return self.read(image).shape[:2]  # type: ignore[return-value]


class DirectoryDataset(Dataset):
    """Every jpg/jpeg/png/webp under `root`, recursively; unreadable files are skipped and counted."""

    def __init__(self, name: str, root: Path) -> None:
        super().__init__(name, f"images under {root}")
        self.root = Path(root)
        self._digests: dict[str, tuple[int, int, str]] = {}  # path -> (size, mtime_ns, digest)
        self._sizes: dict[ImageId, tuple[int, int]] = {}

    def _files(self) -> list[tuple[Path, str]]:
        """(path, dataset-relative name) of every image file, by name: nothing is read."""
        out = []
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=True):
            dirnames.sort()
            for fn in sorted(filenames):
                if fn.lower().endswith(EXTENSIONS) and not fn.startswith("."):
                    full = Path(dirpath) / fn
                    out.append((full, full.relative_to(self.root).as_posix()))
        return out

    def glance(self) -> Listing:
        """The image files found, by name alone (none read, checked or hashed): ids without content digests
        and an empty dataset digest. What ListDatasets says of a folder until its listing is made (hashing a
        large folder takes seconds); nothing is ever indexed from it."""
        if self.known() is not None:
            return self.listing()
        if not self.root.is_dir():
            return Listing([], {".": f"{self.root} is not a directory any more"}, "")
        return Listing(sorted(ImageId(rel, "") for _, rel in self._files()), {}, "")

    def _list(self) -> Listing:
        if not self.root.is_dir():
            return Listing.of([], {".": f"{self.root} is not a directory any more"})
        images, skipped = [], {}
        for full, rel in self._files():
            try:
                st = full.stat()
                cached = self._digests.get(rel)
                if cached and cached[:2] == (st.st_size, st.st_mtime_ns):
                    digest = cached[2]
                else:
                    data = full.read_bytes()
                    with Image.open(io.BytesIO(data)) as img:
                        img.verify()  # header and structure; pixels are decoded when scanned
                    digest = hashlib.sha256(data).hexdigest()[:32]
                    self._digests[rel] = (st.st_size, st.st_mtime_ns, digest)
                images.append(ImageId(rel, digest))
            except Exception as exc:
                skipped[rel] = f"{type(exc).__name__}: {exc}"
        if skipped:
            log.warning("dataset %s: skipped %d unreadable file(s), e.g. %s", self.name, len(skipped),
                        next(iter(skipped.items())))
        return Listing.of(images, skipped)

    def read(self, image: ImageId) -> np.ndarray:
        with Image.open(self.root / image.path) as img:
            return np.asarray(ImageOps.exif_transpose(img).convert("RGB")).copy()

    def size(self, image: ImageId) -> tuple[int, int]:
        cached = self._sizes.get(image)
        if cached is None:
            with Image.open(self.root / image.path) as img:
                w, h = img.size
                if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF rotations by 90 degrees
                    w, h = h, w
            cached = self._sizes[image] = (h, w)
        return cached


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        value = getattr(skimage.data, name)()
        return value[0] if isinstance(value, tuple) else value  # stereo pairs: the left view

    return load


def _sklearn(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return np.asarray(load_sample_image(name))

    return load


# Real photographs that ship inside the wheels (no network). eagle, lily, kidney, skin... need a fetch.
SAMPLES: dict[str, Callable[[], np.ndarray]] = {
    **{f"skimage/{n}.png": _skimage(n) for n in (
        "astronaut", "brick", "camera", "cell", "chelsea", "coffee", "coins", "grass", "gravel",
        "hubble_deep_field", "immunohistochemistry", "moon", "page", "retina", "rocket", "stereo_motorcycle",
        "text")},
    "sklearn/china.jpg": _sklearn("china.jpg"),
    "sklearn/flower.jpg": _sklearn("flower.jpg"),
}


# The file each sample decodes from (package, path inside it): a sample's id digest is its file's content
# digest, as for a folder's images, so listing the samples reads ~8 MB of files and decodes nothing (decoding
# all 19 took ~4 s, which the first ListDatasets used to pay).
SAMPLE_FILES: dict[str, tuple[str, str]] = {
    **{f"skimage/{n}.png": ("skimage", f"data/{n}.png") for n in (
        "astronaut", "brick", "camera", "cell", "chelsea", "coffee", "coins", "grass", "gravel", "moon", "page",
        "text")},
    "skimage/hubble_deep_field.png": ("skimage", "data/hubble_deep_field.jpg"),
    "skimage/immunohistochemistry.png": ("skimage", "data/ihc.png"),
    "skimage/retina.png": ("skimage", "data/retina.jpg"),
    "skimage/rocket.png": ("skimage", "data/rocket.jpg"),
    "skimage/stereo_motorcycle.png": ("skimage", "data/motorcycle_left.png"),
    "sklearn/china.jpg": ("sklearn", "datasets/images/china.jpg"),
    "sklearn/flower.jpg": ("sklearn", "datasets/images/flower.jpg"),
}


def sample_file(path: str) -> Path | None:
    """Where a sample's file lies, found without importing its package (None: not installed here)."""
    package, inside = SAMPLE_FILES[path]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / inside


def _rgb(array: np.ndarray) -> np.ndarray:
    a = np.asarray(array)
    if a.dtype != np.uint8:
        a = np.clip(a * (255.0 if a.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    return np.ascontiguousarray(a[:, :, :3])


def sample_photo(name: str) -> np.ndarray:
    """One of the `samples` photos by its short name ("chelsea", "china"), as RGB uint8 [H, W, 3]."""
    for path, load in SAMPLES.items():
        if path.rsplit("/", 1)[-1].split(".")[0] == name:
            return _rgb(load())
    names = sorted(p.rsplit("/", 1)[-1].split(".")[0] for p in SAMPLES)
    raise KeyError(f"no sample photo {name!r}; there are {', '.join(names)}")


class SamplesDataset(Dataset):
    """The photos that ship with scikit-image and scikit-learn; those that fail to load are skipped."""

    def __init__(self, name: str = "samples") -> None:
        super().__init__(name, "photos shipped inside scikit-image and scikit-learn (no download)")
        self._arrays: dict[str, np.ndarray] = {}

    def _list(self) -> Listing:
        """From the shipped files' bytes (content digests); nothing is decoded until an image is read."""
        images, skipped = [], {}
        for path in SAMPLES:
            try:
                file = sample_file(path)
                if file is None or not file.is_file():
                    raise FileNotFoundError(f"{SAMPLE_FILES[path][1]} is not installed with {SAMPLE_FILES[path][0]}")
                images.append(ImageId(path, hashlib.sha256(file.read_bytes()).hexdigest()[:32]))
            except Exception as exc:  # a package or file missing here
                skipped[path] = f"{type(exc).__name__}: {exc}"
        return Listing.of(images, skipped)

    def refresh(self) -> Listing:
        return self.listing()  # shipped inside packages: cannot change while we run

    def read(self, image: ImageId) -> np.ndarray:
        with self._lock:
            array = self._arrays.get(image.path)
        if array is None:
            array = _rgb(SAMPLES[image.path]())  # decoded on first use (an index scan, a crop)
            with self._lock:
                self._arrays[image.path] = array
        return array
