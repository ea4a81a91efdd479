"""A --model-repo on disk: which model folders it holds, each folder's versions, and when they changed.

    REPO/resnet18/model.toml          flat layout: one version, served as version 1
    REPO/tiny/1/model.toml            versioned layout: each numbered sub-folder is a model folder
    REPO/tiny/2/model.toml            (its own model.toml and files); the highest loaded one serves
                                      calls that name no version

A folder with a `model.toml` of its own is flat, whatever sub-folders it has (its files may live in them).
Names starting with "." are skipped, so a model is best copied in under a hidden name and renamed: a poll
then never sees half a folder. A fingerprint (every file's path, size and mtime) says whether a version
changed since it was read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from convlens.server.models.loaders import CONFIG_FILE

FLAT_VERSION = 1
Fingerprint = tuple[tuple[str, int, int], ...]


@dataclass(frozen=True)
class ModelFolder:
    """One model folder: its versions (number -> folder holding model.toml), or why none can be read."""

    name: str
    path: Path
    versions: dict[int, Path] = field(default_factory=dict)
    error: str = ""  # set: the folder is not a model (no versions)
    flat: bool = False


def model_names(root: Path) -> list[str]:
    """The model folders' names under `root`, sorted; hidden ones skipped."""
    try:
        return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except FileNotFoundError:
        return []


def read_folder(root: Path, name: str) -> ModelFolder:
    """The layout of `root/name` (a missing folder has no versions and says so)."""
    path = root / name
    if "@" in name:
        return ModelFolder(name, path, error=f"a model folder's name may not contain '@' (it separates the "
                                             f"version in requests: NAME@VERSION); rename {name!r}")
    if not path.is_dir():
        return ModelFolder(name, path, error=f"no folder {name!r} in the model repository")
    if (path / CONFIG_FILE).is_file():
        return ModelFolder(name, path, {FLAT_VERSION: path}, flat=True)
    versions = {int(p.name): p for p in path.iterdir()
                if p.is_dir() and p.name.isdigit() and int(p.name) > 0}
    if not versions:
        return ModelFolder(name, path, error=f"no {CONFIG_FILE} in {path} and no version folders "
                                             f"(1/, 2/, ... each with its {CONFIG_FILE})")
    return ModelFolder(name, path, versions)


def fingerprint(path: Path) -> Fingerprint:
    """Every file under `path` (relative path, size, mtime in ns), sorted: equal means unchanged."""
    out = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for filename in filenames:
            full = os.path.join(dirpath, filename)
            try:
                st = os.stat(full)
            except OSError:  # removed while we looked: the next look sees the change
                continue
            out.append((os.path.relpath(full, path), st.st_size, st.st_mtime_ns))
    return tuple(sorted(out))
