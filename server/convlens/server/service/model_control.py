"""Model control: list the repository, load / reload / unload models while the server serves (the
ModelRepositoryService), and in `poll` mode follow the folders on disk.

Modes (--model-control): `none` loads every folder at start and refuses load/unload; `explicit` loads
every folder at start, then changes only on LoadModel / UnloadModel; `poll` follows the folders every
--repository-poll-s seconds (new or changed versions loaded, removed ones unloaded) and LoadModel reads a
folder at once.

Reading a folder runs in a thread; the copies it gave are swapped in on the event loop, where requests look
models up (models/repository.py). A call that already holds the old copy finishes on it (its tasks and jobs
carry it); new calls get the new one. One lock per model name keeps a poll and a LoadModel from reading the
same folder at once. What a version went through last is kept for the index: LOADING while it is read, the
reason when it failed (the copy loaded before, if any, keeps serving), "unloaded" after an unload.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convlens.server.errors import FailedPrecondition, InvalidArgument, NotFound
from convlens.server.models.folders import Fingerprint, ModelFolder, fingerprint, model_names, read_folder
from convlens.server.models.repository import ModelRepository, parse_ref
from convlens.server.service.context import ServiceContext

log = logging.getLogger("convlens.models")

MODES = ("none", "explicit", "poll")
READY, UNAVAILABLE, LOADING = "READY", "UNAVAILABLE", "LOADING"
STATES = (READY, UNAVAILABLE, LOADING)  # a version's state; codecs/repository.py derives the enum table
DiskState = dict[int, Fingerprint]  # version (0: the folder, when it has no readable version) -> fingerprint


@dataclass(frozen=True)
class VersionState:
    """One line of the repository index."""

    name: str
    version: int
    state: str  # READY | UNAVAILABLE | LOADING
    reason: str = ""
    source: str = "repository"  # | "embedded"
    default: bool = False


def disk_state(root: Path, name: str) -> tuple[ModelFolder, DiskState]:
    """A model folder's layout and each version's fingerprint (slow on big folders: run it in a thread)."""
    folder = read_folder(root, name)
    if folder.error:
        return folder, ({0: fingerprint(folder.path)} if folder.path.is_dir() else {})
    return folder, {v: fingerprint(p) for v, p in folder.versions.items()}


class ModelControl:
    def __init__(self, context: ServiceContext, mode: str = "none", poll_s: float = 5.0,
                 metrics: Any = None, seen: dict[str, DiskState] | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"model control must be one of {', '.join(MODES)}, not {mode!r}")
        self.repository: ModelRepository = context.repository
        self.scheduler = context.scheduler  # None in tests without workers: nothing to warm
        self.warm_up = bool(getattr(context.config, "warm_up", True))  # --no-warm-up: copies warm on first use
        self.mode = mode
        self.poll_s = poll_s
        self.metrics = metrics
        self._seen: dict[str, DiskState] | None = seen  # each folder as it was when last read
        self._locks: dict[str, asyncio.Lock] = {}
        self._loading: set[tuple[str, int]] = set()  # version 0: every version of the folder
        self._unloaded: set[tuple[str, int]] = set()
        self._gauged: set[tuple[str, str]] = set()
        self._poller: asyncio.Task[None] | None = None
        self.polls = 0  # completed polls (tests and logs wait on it)

    @property
    def root(self) -> Path | None:
        return self.repository.root

    async def start(self) -> None:
        if self._seen is None:
            self._seen = await asyncio.to_thread(self._disk) if self.root is not None else {}
        self.update_metrics(count_failures=True)
        if self.mode == "poll" and self.root is not None:
            self._poller = asyncio.get_running_loop().create_task(self._poll_forever(), name="convlens-poll")

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
            self._poller = None

    def _disk(self) -> dict[str, DiskState]:
        assert self.root is not None
        return self.disk_snapshot(self.root)

    @staticmethod
    def disk_snapshot(root: Path) -> dict[str, DiskState]:
        """Every model folder's versions and fingerprints (in a thread: it stats every file)."""
        return {name: disk_state(root, name)[1] for name in model_names(root)}

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    # ---- the index ----

    def on_disk(self, names: Iterable[str] | None = None) -> dict[str, set[int]]:
        """The versions on disk of `names` (None: of every model folder). Reads the file system: call it in a
        thread where the event loop would wait (read_index)."""
        if self.root is None:
            return {}
        root = self.root
        return {name: set(read_folder(root, name).versions)
                for name in (self.repository.folder_names() if names is None else names)}

    async def read_index(self, ready_only: bool = False, names: Iterable[str] | None = None) -> list[VersionState]:
        """index() with the folders read in a thread (what the RPCs answer)."""
        names = None if names is None else list(names)
        disk = await asyncio.to_thread(self.on_disk, names)
        return self.index(ready_only, names, disk)

    def index(self, ready_only: bool = False, names: Iterable[str] | None = None,
              disk: dict[str, set[int]] | None = None) -> list[VersionState]:
        """The index lines of `names` (None: every folder and every served model). `disk`: on_disk(names),
        read here when not given."""
        repo = self.repository
        if disk is None:
            names = None if names is None else list(names)
            disk = self.on_disk(names)
        if names is None:
            names = set(disk) | set(repo.names()) | {n for n, _ in repo.problems} | {n for n, _ in self._loading}
        out = []
        for name in sorted(names):
            out += self._states(name, disk.get(name, set()))
        return [s for s in out if s.state == READY] if ready_only else out

    def _states(self, name: str, on_disk: set[int]) -> list[VersionState]:
        repo = self.repository
        served = repo.versions(name)
        default = max(served) if served else None
        if name in repo.embedded:
            return [VersionState(name, v, READY, source="embedded", default=v == default) for v in served]
        problems = {v: r for (n, v), r in repo.problems.items() if n == name}
        loading_all = (name, 0) in self._loading
        versions = set(served) | on_disk | set(problems) | {v for n, v in self._loading if n == name and v}
        if 0 in problems and (served or on_disk):
            versions.add(0)
        out = []
        for v in sorted(versions):
            loading = v != 0 and (loading_all or (name, v) in self._loading)
            if loading:
                state, reason = LOADING, ("reloading: the copy loaded before serves until the new one is ready"
                                          if v in served else "loading")
            elif v in served:
                state = READY
                reason = (f"the last load failed ({problems[v]}); the copy loaded before still serves"
                          if v in problems else "" if v in on_disk or self.root is None
                          else "its folder is gone; still served until unloaded")
            elif v in problems:
                state, reason = UNAVAILABLE, problems[v]
            elif (name, v) in self._unloaded:
                state, reason = UNAVAILABLE, "unloaded"
            elif self.mode == "poll":
                state, reason = UNAVAILABLE, "not read yet: the next poll loads it"
            else:
                state, reason = UNAVAILABLE, "not loaded"
            out.append(VersionState(name, v, state, reason, default=v == default))
        if not out and loading_all:
            out.append(VersionState(name, 0, LOADING, "loading"))
        return out

    # ---- load / unload ----

    def _refuse(self, what: str) -> None:
        if self.mode == "none":
            raise FailedPrecondition(f"model control is off (--model-control none): {what} is not allowed; start "
                                     "the server with --model-control explicit (or poll)", reason="MODEL_CONTROL_OFF")
        if self.root is None:
            raise FailedPrecondition(f"this server has no --model-repo: there is nothing to {what}",
                                     reason="NO_MODEL_REPOSITORY")

    def _refuse_embedded(self, name: str) -> None:
        if name in self.repository.embedded:
            raise FailedPrecondition(f"{name!r} is an embedded model, part of the server: it cannot be loaded "
                                     "or unloaded (serve with --no-embedded to leave it out)", reason="EMBEDDED_MODEL")

    @staticmethod
    def _target(ref: str, version: int | None) -> tuple[str, int | None]:
        name, named = parse_ref(ref, "model")
        if not name:
            raise InvalidArgument("model: name the model folder", field="model")
        if named is not None and version is not None and named != version:
            raise InvalidArgument(f"model {ref!r} names version {named} but version is {version}",
                                  field="version")
        if version is not None and version <= 0:
            raise InvalidArgument("version must be a positive version number (a folder MODEL/VERSION/)",
                                  field="version")
        return name, named if named is not None else version

    async def load(self, ref: str, version: int | None = None) -> list[VersionState]:
        """Load (or reload) every version of a folder, or one; FailedPrecondition if one fails."""
        name, version = self._target(ref, version)
        self._refuse("load")
        assert self.root is not None
        self._refuse_embedded(name)
        if not (self.root / name).is_dir() or name.startswith("."):
            raise NotFound(f"no model folder {name!r} in the model repository {self.root}; folders: "
                           f"{', '.join(self.repository.folder_names()) or 'none'}", field="model",
                           reason="MODEL_NOT_FOUND")
        async with self._lock(name):
            problems = await self._read(name, [version] if version is not None else None)
        if problems:
            raise FailedPrecondition(f"model {name!r} could not be loaded: " + "; ".join(
                f"{f'version {v}: ' if v else ''}{r}" for v, r in sorted(problems.items())), reason="MODEL_LOAD_FAILED")
        return await self.read_index(names=[name])

    async def _read(self, name: str, versions: list[int] | None, removed: Iterable[int] = ()) -> dict[int, str]:
        """Read `name`'s folder (every version, or `versions`), warm what loaded (every lane's replica made and
        run once, as at start-up) and swap it in; returns the problems. Under the name's lock. `versions`
        None: versions gone from the folder are unloaded too. The index says LOADING until the swap."""
        assert self.root is not None and self._seen is not None
        keys = {(name, v) for v in versions} if versions is not None else {(name, 0)}
        self._loading |= keys
        try:
            folder, state = await asyncio.to_thread(disk_state, self.root, name)  # before reading: a change
            if versions is not None and not folder.error:                          # while reading is seen next
                missing = [v for v in versions if v not in folder.versions]
                if missing:
                    raise NotFound(f"model {name!r} has no version folder {name}/{missing[0]}/; versions: "
                                   f"{', '.join(map(str, folder.versions)) or 'none'}", field="version",
                                   reason="MODEL_VERSION_NOT_FOUND")
            read = await asyncio.to_thread(self.repository.read, name, versions)
            await self._warm(name, list(read.copies.values()))
        finally:
            self._loading -= keys
        replaced = self.repository.apply(read, replace_all=versions is None and 0 not in read.problems)
        gone = [c for v in removed for c in self.repository.remove(name, v)]
        seen = self._seen.setdefault(name, {})
        if versions is None:
            seen.clear()
        seen.update({v: fp for v, fp in state.items() if versions is None or v in versions or v == 0})
        for v in removed:
            seen.pop(v, None)
        self._unloaded -= {(name, v) for v in read.copies}
        for copy in [*replaced, *gone]:
            log.info("model %s: copy %d retired (calls in flight finish on it)", copy.ref, copy.copy_id)
        self.update_metrics(failures=[f"{name}@{v}" if v and not read.folder.flat else name for v in read.problems])
        return read.problems

    async def _warm(self, name: str, copies: list[Any]) -> None:
        """The new copies' replicas made and run once on every lane before they serve, so the first calls
        after a load or reload do not pay for them (scheduler.warm, as at start-up; skipped with
        --no-warm-up). The lanes take it between batches: the copy serving now keeps answering meanwhile."""
        if not copies or self.scheduler is None or not self.warm_up:
            return
        started = time.monotonic()
        try:
            await self.scheduler.warm(copies)
        except RuntimeError as exc:  # the scheduler is stopping: the server serves nothing more anyway
            log.warning("model %s: not warmed (%s)", name, exc)
            return
        log.info("model %s: replicas of %d new copies made and run once on every lane in %.2f s", name,
                 len(copies), time.monotonic() - started)

    async def unload(self, ref: str, version: int | None = None) -> list[VersionState]:
        name, version = self._target(ref, version)
        self._refuse("unload")
        if self.mode == "poll":
            raise FailedPrecondition("in poll mode the folders decide what is served: remove the folder (or its "
                                     "version folder) from the model repository to unload it", reason="POLL_MODE")
        self._refuse_embedded(name)
        async with self._lock(name):
            served = self.repository.versions(name)
            if not served:
                raise NotFound(f"model {name!r} is not served; served models: "
                               f"{', '.join(self.repository.names()) or 'none'}", field="model",
                               reason="MODEL_NOT_FOUND")
            if version is not None and version not in served:
                raise NotFound(f"model {name!r} has no version {version} served; served versions: "
                               f"{', '.join(map(str, served))}", field="version",
                               reason="MODEL_VERSION_NOT_FOUND")
            for copy in self.repository.remove(name, version):
                self._unloaded.add((name, copy.version))
                log.info("model %s unloaded (calls in flight finish on copy %d)", copy.ref, copy.copy_id)
        self.update_metrics()
        return await self.read_index(names=[name])

    # ---- poll ----

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.poll_once()
            except Exception:  # a poll must never stop the polling (nor the server)
                log.exception("repository poll failed")

    async def poll_once(self) -> None:
        """Bring what is served in line with the folders: read new and changed versions, unload removed ones."""
        assert self._seen is not None
        disk = await asyncio.to_thread(self._disk)
        for name in sorted(set(disk) | set(self._seen)):
            now, before = disk.get(name), self._seen.get(name, {})
            if now == before:
                continue
            async with self._lock(name):
                if now is None:  # the folder is gone
                    for copy in self.repository.remove(name):
                        log.info("model %s unloaded: its folder is gone (calls in flight finish on it)", copy.ref)
                    self.repository.problems = {k: r for k, r in self.repository.problems.items() if k[0] != name}
                    self._seen.pop(name, None)
                    self.update_metrics()
                    continue
                changed = [v for v, fp in now.items() if before.get(v) != fp]
                removed = [v for v in before if v not in now and v != 0]
                if 0 in now:  # the folder has no readable version: say why, keep what serves
                    await self._read(name, None)
                else:
                    await self._read(name, [v for v in changed if v != 0], removed=removed)
                    self.repository.problems.pop((name, 0), None)
        self.polls += 1

    # ---- metrics ----

    def update_metrics(self, failures: Iterable[str] = (), count_failures: bool = False) -> None:
        """convlens_model_loaded{model,format}: how many versions of each model are served in that format
        (0 once unloaded); convlens_model_load_failures_total counts each failed load."""
        if self.metrics is None:
            return
        counts: dict[tuple[str, str], int] = {}
        for copy in self.repository.copies():
            counts[(copy.name, copy.format)] = counts.get((copy.name, copy.format), 0) + 1
        for key in self._gauged | set(counts):
            self.metrics.model_loaded.labels(*key).set(counts.get(key, 0))
        self._gauged |= set(counts)
        if count_failures:
            failures = list(self.repository.failures)
        for ref in failures:
            self.metrics.model_load_failures.labels(ref).inc()
