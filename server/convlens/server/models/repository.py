"""The models a server serves: the embedded default plus one per folder of --model-repo, each in its versions.

A request names a model as NAME (its highest served version) or NAME@VERSION (that one). Each served
version is one *copy* (a ServedModel with its own `copy_id`); loading a version again installs a new copy
in place of the old one, and calls that already hold the old copy finish on it (the scheduler keeps them
apart: a batch never mixes copies). Reading folders is slow and runs off the event loop (`read`);
installing and removing copies is quick and happens where requests look models up (`install`, `remove`),
so a lookup sees either the old copy or the new one, never half of each.

A folder or version that cannot be loaded is recorded in `problems` ((name, version) -> reason; version 0:
the folder as a whole) and logged; the other models are still served.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from convlens.server.errors import InvalidArgument, NotFound
from convlens.server.models.embedded import load_embedded
from convlens.server.models.folders import ModelFolder, read_folder
from convlens.server.models.folders import model_names as folder_names
from convlens.server.models.loaders import ModelConfigError, load_folder
from convlens.server.models.model import ServedModel

log = logging.getLogger("convlens.models")
_COPY_IDS = itertools.count(1)


def parse_ref(ref: str, field_name: str = "model") -> tuple[str, int | None]:
    """NAME or NAME@VERSION -> (name, version or None)."""
    name, sep, version = ref.rpartition("@")
    if not sep:
        return ref, None
    if not (version.isdigit() and int(version) > 0 and name):
        raise InvalidArgument(f"{field_name} {ref!r}: expected NAME or NAME@VERSION with a positive version "
                              "number", field=field_name)
    return name, int(version)


@dataclass
class FolderRead:
    """What reading one model folder (or one of its versions) gave: copies to install and problems."""

    folder: ModelFolder
    copies: dict[int, ServedModel] = field(default_factory=dict)
    problems: dict[int, str] = field(default_factory=dict)  # version (0: the folder) -> reason


def describe(exc: Exception) -> str:
    return str(exc) if isinstance(exc, ModelConfigError) else f"{type(exc).__name__}: {exc}"


class ModelRepository:
    def __init__(self, models: list[ServedModel] | None = None,
                 failures: dict[str, str] | None = None, *, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else None
        self._versions: dict[str, dict[int, ServedModel]] = {}
        self.embedded: set[str] = set()
        self.problems: dict[tuple[str, int], str] = {(n, 0): r for n, r in (failures or {}).items()}
        self._flat: set[str] = set()
        for model in models or []:
            self.add(model)

    @classmethod
    def load(cls, model_repo: Path | None, *, include_embedded: bool = True) -> ModelRepository:
        if model_repo is not None and not Path(model_repo).is_dir():
            raise FileNotFoundError(f"--model-repo {model_repo} is not a directory")
        repo = cls(root=model_repo)
        if include_embedded:
            models, failures = load_embedded()
            for model in models:
                repo.add(model)
                repo.embedded.add(model.name)
            repo.problems.update({(n, 0): r for n, r in failures.items()})
        for name in repo.folder_names():
            repo.apply(repo.read(name))
        log.info("serving %d model(s): %s", len(repo._versions), ", ".join(repo.names()) or "none")
        return repo

    # ---- reading folders (slow: off the event loop) ----

    def folder_names(self) -> list[str]:
        return folder_names(self.root) if self.root is not None else []

    def read(self, name: str, versions: Iterable[int] | None = None) -> FolderRead:
        """Load `name`'s folder: every version it holds, or only `versions`. Installs nothing."""
        assert self.root is not None, "no --model-repo"
        folder = read_folder(self.root, name)
        out = FolderRead(folder)
        if name in self.embedded:
            out.problems[0] = f"a model named {name!r} is already served (embedded)"
            return out
        if folder.error:
            out.problems[0] = folder.error
            return out
        for version in sorted(folder.versions if versions is None else versions):
            path = folder.versions.get(version)
            if path is None:
                out.problems[version] = f"no version folder {name}/{version}/ in the model repository"
                continue
            try:
                out.copies[version] = load_folder(path, name=name, version=version)
            except Exception as exc:  # one broken version must not take the others down
                out.problems[version] = describe(exc)
        return out

    def apply(self, read: FolderRead, *, replace_all: bool = False) -> list[ServedModel]:
        """Install what `read` loaded and record its problems (a version that failed keeps the copy it had,
        if any); `replace_all`: versions no longer in the folder are removed. Returns the copies replaced
        or removed."""
        name = read.folder.name
        if read.folder.flat:
            self._flat.add(name)
        else:
            self._flat.discard(name)
        for key in [k for k in self.problems if k[0] == name and (k[1] in read.problems or k[1] in read.copies
                                                                    or k[1] == 0 or replace_all)]:
            del self.problems[key]
        old = []
        for version, reason in read.problems.items():
            self.problems[(name, version)] = reason
            log.error("model %s not served: %s", f"{name}@{version}" if version else name, reason)
        for copy in read.copies.values():
            previous = self.install(copy)
            if previous is not None:
                old.append(previous)
            log.info("loaded model %s (%s, %d layers)", copy.ref, copy.format, len(copy.layers))
        if replace_all:
            gone = set(self._versions.get(name, {})) - set(read.copies) - set(read.problems)
            for version in gone:
                old += self.remove(name, version)
        return old

    # ---- the served copies (quick: where requests look them up) ----

    def add(self, model: ServedModel) -> None:
        if model.name in self._versions:
            raise ValueError(f"duplicate model name {model.name!r}")
        self.install(model)

    def install(self, model: ServedModel) -> ServedModel | None:
        """Serve `model` as its name and version (a new copy identity); returns the copy it replaces."""
        model.copy_id = next(_COPY_IDS)
        versions = self._versions.setdefault(model.name, {})
        previous = versions.get(model.version)
        versions[model.version] = model
        self._versions[model.name] = dict(sorted(versions.items()))
        return previous

    def remove(self, name: str, version: int | None = None) -> list[ServedModel]:
        """Stop serving `name` (every version, or one); returns the copies removed."""
        versions = self._versions.get(name, {})
        gone = [versions.pop(v) for v in ([version] if version is not None else list(versions)) if v in versions]
        if not versions:
            self._versions.pop(name, None)
        return gone

    def get(self, ref: str) -> ServedModel:
        name, version = parse_ref(ref)
        versions = self._versions.get(name)
        if not versions:
            raise NotFound(f"no model {name!r}; served models: {', '.join(self.names()) or 'none'}",
                           field="model", reason="MODEL_NOT_FOUND")
        if version is None:
            return versions[max(versions)]
        try:
            return versions[version]
        except KeyError:
            raise NotFound(f"model {name!r} has no version {version} served; served versions: "
                           f"{', '.join(map(str, versions))}", field="model",
                           reason="MODEL_VERSION_NOT_FOUND") from None

    def versions(self, name: str) -> dict[int, ServedModel]:
        return dict(self._versions.get(name, {}))

    @property
    def failures(self) -> dict[str, str]:
        """Problems keyed as people name them: NAME for a folder (or a flat one's model), NAME@VERSION."""
        return {(n if v == 0 or n in self._flat else f"{n}@{v}"): r for (n, v), r in self.problems.items()}

    def names(self) -> list[str]:
        return list(self._versions)

    def models(self) -> list[ServedModel]:
        """Each name's default copy (its highest version)."""
        return [versions[max(versions)] for versions in self._versions.values()]

    def copies(self) -> list[ServedModel]:
        """Every served copy, each name's versions in order."""
        return [m for versions in self._versions.values() for m in versions.values()]

    def __contains__(self, name: object) -> bool:
        return name in self._versions

    def __len__(self) -> int:
        return len(self._versions)
