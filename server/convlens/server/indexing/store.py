"""Where indexes live on disk, keyed by what they depend on: model weights, dataset contents, layer.

    <index-dir>/<model>/<weights digest>/<dataset>/<dataset digest>/<layer>.npz
    <index-dir>/<model>/<weights digest>/<dataset>/<dataset digest>/<layer>.shard-I-of-N.npz

A digest in the path means a changed model or dataset simply finds no file and builds a new one.
"""

from __future__ import annotations

import hashlib
import os
import re
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from convlens.server.engine.topk import file_format
from convlens.server.engine.topk.index import TopKIndex, coverage_of
from convlens.server.scheduler.memory import index_write_stall, injected_faults

_DIGEST_CACHE: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


def default_index_dir() -> Path:
    """A per-user cache directory (XDG_CACHE_HOME, else ~/.cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "convlens" / "index"


def weights_digest(module: nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes); cached per module object."""
    cached = _DIGEST_CACHE.get(module)
    if cached is not None:
        return cached
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    digest = h.hexdigest()
    _DIGEST_CACHE[module] = digest
    return digest


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "_"


@dataclass(frozen=True)
class IndexKey:
    model: str
    weights: str  # weights digest (hex)
    dataset: str
    dataset_digest: str  # hex
    layer: str

    def folder(self, root: Path) -> Path:
        return Path(root) / _safe(self.model) / self.weights[:16] / _safe(self.dataset) / self.dataset_digest[:16]

    def path(self, root: Path) -> Path:
        return self.folder(root) / f"{_safe(self.layer)}.npz"

    def shard_path(self, root: Path, shard: int, shards: int) -> Path:
        return self.folder(root) / f"{_safe(self.layer)}.shard-{shard}-of-{shards}.npz"

    def meta(self) -> dict[str, str]:
        return {"model": self.model, "weights": self.weights, "dataset": self.dataset,
                "dataset_digest": self.dataset_digest, "layer": self.layer}


def load_if_valid(path: Path, key: IndexKey) -> TopKIndex | None:
    """The stored index when it exists and was built for exactly this key; None otherwise."""
    if not path.is_file():
        return None
    try:
        index = file_format.load(path)
    except Exception:
        return None
    return index if index.meta.get("key") == repr(sorted(key.meta().items())) else None


def save(index: TopKIndex, path: Path) -> None:
    """Write an index file atomically (engine/topk/file_format.save); every writer of indexes goes through here,
    so the test-only fault CONVLENS_TEST_FAULTS=index_write_stall=1 can stop any of them halfway."""
    file_format.save(index, path, after_part=index_write_stall(injected_faults()))


def stamp(index: TopKIndex, key: IndexKey) -> TopKIndex:
    index.meta["key"] = repr(sorted(key.meta().items()))
    index.meta.update(key.meta())
    return index


def complete(index: TopKIndex, images: list) -> bool:  # type: ignore[type-arg]
    """Whether the index covers exactly these images (skipped-while-scanning ones aside)."""
    skipped = int(index.meta.get("skipped_count", "0"))
    return index.count + skipped == len(images) and (skipped > 0 or index.coverage == coverage_of(images))
