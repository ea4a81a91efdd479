"""Build an atlas: plan the units, compute the unfinished ones in parallel through the SDK (so the server's
step scheduler batches their visualisations), record each in the manifest as it finishes, write the site."""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from PIL import Image

from .._client import Client
from .._types import ModelDetails
from . import _pages as pages
from ._assets import CSS, JS
from ._manifest import Manifest
from ._plan import AtlasOptions, Plan, UnitKey, blocks, depth, match_depths, plan, slug
from ._unit import ClassPredictor, compute_unit


@dataclass(frozen=True)
class BuildReport:
    root: Path
    units: int  # in the plan
    computed: int  # by this build
    reused: int  # finished by an earlier build (not recomputed)
    seconds: float
    class_predictions: int  # Saliency calls made for class associations


class ProgressBar:
    """`[######------]  7/12 units  41 s, ~30 s left` on one terminal line."""

    def __init__(self, stream: TextIO | None, total: int, done: int, width: int = 30) -> None:
        self.stream, self.total, self.done, self.width = stream, total, done, width
        self.start, self.fresh = time.monotonic(), 0
        self._lock = threading.Lock()
        self.draw()

    def advance(self) -> None:
        with self._lock:
            self.done += 1
            self.fresh += 1
            self.draw()

    def draw(self) -> None:
        if self.stream is None:
            return
        elapsed = time.monotonic() - self.start
        filled = self.width * self.done // max(self.total, 1)
        left = ""
        if self.fresh and self.done < self.total:
            left = f", ~{elapsed / self.fresh * (self.total - self.done):.0f} s left"
        self.stream.write(f"\r[{'#' * filled}{'-' * (self.width - filled)}] {self.done:>4}/{self.total} units  "
                          f"{elapsed:.0f} s{left}   ")
        self.stream.flush()

    def finish(self) -> None:
        if self.stream is not None:
            self.stream.write("\n")
            self.stream.flush()


def _plans(client: Client, options: AtlasOptions) -> tuple[list[Plan], list[tuple[str, float, str, float]]]:
    first = client.get_model(options.model, timeout=options.timeout)
    plans = [plan(first, options)]
    rows: list[tuple[str, float, str, float]] = []
    if options.compare:
        second = client.get_model(options.compare, timeout=options.timeout)
        left = [(layer.name, depth(first, layer.name)) for layer in plans[0].layers]
        right = [(layer.name, depth(second, layer.name)) for layer in blocks(second)]
        pairs = match_depths(left, right)
        plans.append(plan(second, options, layers=list(dict.fromkeys(b for _, b in pairs))))
        rows = [(a, depth(first, a), b, depth(second, b)) for a, b in pairs]
    return plans, rows


def _whole_png(path: Path) -> bool:
    """`path` is a complete image (a file torn by an older build's interrupted write is not)."""
    try:
        with Image.open(path) as image:
            image.load()
        return True
    except (OSError, SyntaxError):  # missing, truncated or not an image
        return False


def _filters(client: Client, details: ModelDetails, root: Path, timeout: float) -> str | None:
    """The first conv layer's filters as a server-rendered grid, once per model."""
    layer = next((item for item in details.layers if item.has_filters), None)
    if layer is None:
        return None
    path = root / slug(details.info.name) / "filters.png"
    # Written whole or not at all (a temporary file, then os.replace); one left torn by an older build is
    # written again.
    if not _whole_png(path):
        grid = client.get_filters(details.info.name, layer.name, grid=True, timeout=timeout).grid
        if grid is None:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".filters-", suffix=".png", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                grid.save(f, format="PNG")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path.name


def build_atlas(client: Client, out: str | Path, options: AtlasOptions, *,
                progress: TextIO | None = sys.stderr) -> BuildReport:
    """Build (or finish) the atlas in `out`; a unit the manifest lists as finished is not recomputed."""
    started = time.monotonic()
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(root, options.signature())
    plans, rows = _plans(client, options)
    units = [u for p in plans for u in p.units]
    todo = [u for u in units if not manifest.done(u.id)]
    reused = len(units) - len(todo)
    filters = {p.details.info.name: _filters(client, p.details, root, options.timeout) for p in plans}
    predictor = ClassPredictor(client, options.timeout)
    bar = ProgressBar(progress, len(units), reused)

    def one(key: UnitKey) -> None:
        manifest.record(key.id, compute_unit(client, key, options, predictor, root))
        bar.advance()

    pool = ThreadPoolExecutor(max(1, options.jobs), thread_name_prefix="atlas")
    pending: set[Future[None]] = {pool.submit(one, key) for key in todo}
    try:
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                future.result()  # the first failure stops the build; finished units stay recorded
    except BaseException:
        # Ctrl-C or a failed call: queued units are dropped, those in flight finish and are recorded.
        pool.shutdown(wait=True, cancel_futures=True)
        bar.finish()
        write_site(root, plans, manifest.units, rows, filters)
        raise
    pool.shutdown()
    bar.finish()
    write_site(root, plans, manifest.units, rows, filters)
    return BuildReport(root, len(units), len(todo), reused, time.monotonic() - started, predictor.calls)


def _same_channel(per_layer: dict[str, list[UnitKey]], mapped: Sequence[str], index: int, channel: int
                  ) -> UnitKey | None:
    """The finished unit of `channel` in the index-th mapped layer, if there is one."""
    if not 0 <= index < len(mapped):
        return None
    return next((u for u in per_layer[mapped[index]] if u.channel == channel), None)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def write_site(root: Path, plans: Sequence[Plan], done: dict[str, dict[str, Any]],
               rows: Sequence[tuple[str, float, str, float]], filters: dict[str, str | None]) -> None:
    """Every page, from the finished units' entries (an unfinished unit is simply not shown yet)."""
    _write(root / "atlas.css", CSS)
    _write(root / "atlas.js", JS)
    entries = [done[u.id] for p in plans for u in p.units if u.id in done]
    _write(root / "search.js", pages.search_script(entries))
    counts = [(p.details, sum(u.id in done for u in p.units)) for p in plans]
    _write(root / "index.html", pages.index_page(counts, compare=bool(rows)))
    thumbs: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for p in plans:
        model = p.details.info.name
        mapped = [layer.name for layer in p.layers]
        finished = [u for u in p.units if u.id in done]
        per_layer = {name: [u for u in finished if u.layer == name] for name in mapped}
        _write(root / slug(model) / "index.html",
               pages.model_page(p.details, {k: len(v) for k, v in per_layer.items()}, filters.get(model)))
        for i, layer in enumerate(p.layers):
            keys = per_layer[layer.name]
            _write(root / slug(model) / slug(layer.name) / "index.html",
                   pages.layer_page(p.details, layer, mapped, [done[u.id] for u in keys]))
            thumbs[(model, layer.name)] = [
                (u.page(), f"{u.image_dir()}/{done[u.id]['fv']['file']}") for u in keys[:6]]
            for j, key in enumerate(keys):
                neighbours = {"previous unit": keys[j - 1] if j > 0 else None,
                              "next unit": keys[j + 1] if j + 1 < len(keys) else None,
                              "layer below": _same_channel(per_layer, mapped, i - 1, key.channel),
                              "layer above": _same_channel(per_layer, mapped, i + 1, key.channel)}
                _write(root / key.page(), pages.unit_page(done[key.id], neighbours, key))
    if rows and len(plans) > 1:
        _write(root / "compare.html", pages.compare_page(plans[0].details.info.name, plans[1].details.info.name,
                                                         rows, thumbs))
