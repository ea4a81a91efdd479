"""The top-k index's file format: an .npz of its arrays plus a JSON header (no pickle).

What --index-dir files, `convlens index build` shards and Ray partials hold. A file of another
FORMAT_VERSION is refused (rebuild the index).
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from convlens.server.engine.topk.index import RANKINGS, ImageId, Table, TopKIndex

FORMAT_VERSION = 1


def to_bytes(index: TopKIndex) -> bytes:
    """An .npz of the arrays plus a JSON header (no pickle): what files and Ray partials hold."""
    header = {"version": FORMAT_VERSION, "layer": index.layer, "channels": index.channels,
              "map_hw": list(index.map_hw), "k_max": index.k_max, "per_image": index.per_image,
              "count": index.count, "coverage": str(index.coverage), "meta": index.meta,
              "images": [[i.path, i.digest] for i in index.images]}
    arrays: dict[str, np.ndarray] = {"sum_mean": index.sum_mean, "max": index.max, "positive": index.positive}
    for name in RANKINGS:
        for part, a in zip(("values", "images", "ys", "xs"), index.tables[name].arrays(), strict=True):
            arrays[f"{name}.{part}"] = a
    buf = io.BytesIO()
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def from_bytes(data: bytes, *, source: str = "index") -> TopKIndex:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        header = json.loads(z["header"].tobytes().decode())
        if header.get("version") != FORMAT_VERSION:
            raise ValueError(f"{source}: index format {header.get('version')}, expected {FORMAT_VERSION}")
        tables = {name: Table(*(z[f"{name}.{p}"] for p in ("values", "images", "ys", "xs")))
                  for name in RANKINGS}
        return TopKIndex(header["layer"], header["channels"], tuple(header["map_hw"]),
                         header["k_max"], header["per_image"], [ImageId(p, d) for p, d in header["images"]],
                         tables, header["count"], int(header["coverage"]), z["sum_mean"], z["max"],
                         z["positive"], dict(header["meta"]))


def save(index: TopKIndex, path: Path) -> None:
    """Atomically: a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(to_bytes(index))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: Path) -> TopKIndex:
    return from_bytes(Path(path).read_bytes(), source=str(path))
