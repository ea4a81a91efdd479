"""The top-k index's file format: an .npz of its arrays plus a JSON header (no pickle).

What --index-dir files, `convlens index build` shards and Ray partials hold. A file of another
FORMAT_VERSION is refused (rebuild the index).
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import socket
import tempfile
import time
from collections.abc import Callable
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


STALE_SECONDS = 3600.0  # a temporary file this old was left by a writer that died (a write takes seconds)


def save(index: TopKIndex, path: Path, *, after_part: Callable[[Path], None] | None = None) -> None:
    """Atomically and durably: a reader sees the old file or the new one, never half of one, even after a
    writer killed mid-write (SIGKILL: the half-written temporary is never renamed) or a power loss (the data
    is synced before the rename). Temporaries that writers which died left for this file are removed first.

    `after_part` (tests): called with the temporary's path once half of the bytes are written and flushed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    data = to_bytes(index)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.{_writer()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            half = len(data) // 2
            f.write(data[:half])
            if after_part is not None:
                f.flush()
                after_part(Path(tmp))
            f.write(data[half:])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)


def _writer() -> str:
    """Who writes a temporary: host and process, so that a later writer can tell one whose process is gone."""
    return f"{re.sub(r'[^A-Za-z0-9-]', '-', socket.gethostname())}-{os.getpid()}"


def temporaries(path: Path) -> list[Path]:
    """The temporary files writers of `path` made (finished writes leave none)."""
    path = Path(path)
    return sorted(path.parent.glob(f"{glob.escape(path.name)}.*.tmp")) if path.parent.is_dir() else []


def remove_stale_temporaries(path: Path, *, now: float | None = None) -> list[Path]:
    """Remove the temporaries of `path` whose writer is gone: a process of this host that no longer runs, or
    (any host) untouched for STALE_SECONDS. A write in progress elsewhere is left alone. Returns the removed."""
    now = time.time() if now is None else now
    host = _writer().rsplit("-", 1)[0]
    removed = []
    for tmp in temporaries(path):
        writer = tmp.name[len(Path(path).name) + 1:].split(".", 1)[0]  # HOST-PID
        who, _, pid = writer.rpartition("-")
        try:
            gone = (who == host and pid.isdigit() and not _running(int(pid))) \
                or now - tmp.stat().st_mtime > STALE_SECONDS
            if gone:
                tmp.unlink()
                removed.append(tmp)
        except FileNotFoundError:  # its writer finished (renamed it) or another cleaner was first
            continue
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


def _sync_folder(folder: Path) -> None:
    """The rename itself survives a power loss once the folder is synced (where the OS allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load(path: Path) -> TopKIndex:
    return from_bytes(Path(path).read_bytes(), source=str(path))
