"""The atlas of a small model, built through the SDK from a test server with `--compare` against a second
model, then opened in a real browser: Debian's chromium, driven by Playwright, clicks model -> layer ->
unit, checks every image loaded and no console error, opens the comparison page, uses the search box, and
saves a screenshot.

The build itself is checked without a browser (those tests always run): its visualisations shared
optimisation steps (the server's step-batch histogram), each photo's class was asked once and on the photo
itself, and the second model's layers were matched by relative depth. The browser tests are skipped only
where Debian's chromium is not installed (`apt-get install -y chromium`; `make test` installs it when it
runs as root) or Playwright is missing; never `playwright install` (no download happens).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from convlens.client import Client
from convlens.client._types import LayerInfo, ModelDetails, ModelInfo
from convlens.client.atlas import MANIFEST_NAME, AtlasOptions, BuildReport, build_atlas
from convlens.client.atlas._build import write_site
from convlens.client.atlas._plan import blocks, depth, plan
from convlens.server.launcher import ServerProcess
from tests.client.test_atlas_plan import fake_entry
from tests.e2e.test_maximize_e2e import metric
from tools.atlas.browser import MISSING, available, launch

pytestmark = pytest.mark.slow
MODEL = "resnet18"  # the e2e repository's small torchvision net (10 classes at 64 px, random weights)
SECOND = "efficientnet_lite0"  # served by every test server (embedded): the --compare model
LAYERS = ("layer1.0", "layer2.0")
CHANNELS = (0, 1, 2)


@dataclass(frozen=True)
class Built:
    out: Path
    report: BuildReport
    units: dict[str, dict[str, Any]]  # the manifest's
    job_steps: float  # MaximizeUnit optimisation steps the build's jobs took
    batch_sizes: float  # the sum, over those steps, of the number of jobs stepped in the same pass
    saliency_calls: float  # Saliency calls the server answered during the build


def step_histogram(server: ServerProcess) -> tuple[float, float]:
    """convlens_step_batch_size: each job's step observes how many jobs its batched pass stepped."""
    return (metric(server, "convlens_step_batch_size_sum", rpc="MaximizeUnit"),
            metric(server, "convlens_step_batch_size_count", rpc="MaximizeUnit"))


def saliency_ok(server: ServerProcess) -> float:
    return metric(server, "grpc_server_handled_total", grpc_method="Saliency", grpc_code="OK")


@pytest.fixture(scope="module")
def atlas(server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Built:
    out = tmp_path_factory.mktemp("atlas")
    options = AtlasOptions(MODEL, layers=LAYERS, channels=CHANNELS, steps=8, size=32, jobs=3, top_k=3,
                           diverse_images=2, compare=SECOND)
    (sizes_before, steps_before), saliency_before = step_histogram(server), saliency_ok(server)
    with Client(server.address, timeout=120) as client:
        report = build_atlas(client, out, options, progress=None)
    (sizes_after, steps_after), saliency_after = step_histogram(server), saliency_ok(server)
    units = json.loads((out / MANIFEST_NAME).read_text())["units"]
    return Built(out, report, units, steps_after - steps_before, sizes_after - sizes_before,
                 saliency_after - saliency_before)


def test_the_builds_visualisations_share_optimisation_steps(atlas: Built) -> None:
    """--jobs 3: units computed in parallel, so the server's step scheduler stepped their MaximizeUnit jobs
    together: the mean number of jobs per pass, over the build's steps, is above 1 (alone it is exactly 1)."""
    assert atlas.report.computed == len(atlas.units) == 12  # 2 layers x 3 channels, of each model
    # 12 units x (a default job + a 2-image diverse job) x 8 steps, each step observed once.
    assert atlas.job_steps == 12 * 2 * 8
    assert atlas.batch_sizes / atlas.job_steps > 1.0, (atlas.batch_sizes, atlas.job_steps)


def test_each_photos_class_is_asked_once_and_on_the_photo_itself(atlas: Built, server: ServerProcess) -> None:
    per_photo: dict[tuple[str, str], set[str | None]] = {}
    for unit in atlas.units.values():
        for item in unit["top"]:
            per_photo.setdefault((unit["model"], item["source"]), set()).add(item["label"])
    # One Saliency call per (model, photo), however many units' top lists (3 threads at once) held it.
    assert atlas.saliency_calls == atlas.report.class_predictions == len(per_photo)
    assert all(len(labels) == 1 and None not in labels for labels in per_photo.values()), per_photo
    # The label is the model's top-1 on the plain photo (not on any unit's boxed copy of it).
    with Client(server.address, timeout=120) as client:
        for model, layer in ((MODEL, LAYERS[0]), (SECOND, next(u["layer"] for u in atlas.units.values()
                                                               if u["model"] == SECOND))):
            top = client.top_activations(model, layer, 0, k=3, outputs=["entries", "photos", "images"])
            for item in top:
                assert item.photo is not None and item.image is not None
                label = client.saliency(item.photo, model, overlay=False, outputs=["predictions"]).predictions[0]
                assert per_photo[(model, item.source)] == {label.label}
                # The photo is the boxed picture without its box: same size, the same pixels away from it.
                plain, boxed = np.asarray(item.photo), np.asarray(item.image)
                assert plain.shape == boxed.shape
                ys, xs = np.nonzero((plain != boxed).any(axis=2))
                scale = item.photo.width / item.geometry.original_width if item.geometry else 1.0
                x0, y0, x1, y1 = (v * scale for v in item.original_box)
                assert len(xs) > 0  # the outline: drawn inside the scaled box, a few px wide, nothing else
                assert x0 - 2 <= xs.min() and xs.max() <= x1 + 1 and y0 - 2 <= ys.min() and ys.max() <= y1 + 1


def test_compare_matches_the_second_models_blocks_by_relative_depth(atlas: Built, server: ServerProcess) -> None:
    with Client(server.address, timeout=120) as client:
        first, second = client.get_model(MODEL), client.get_model(SECOND)
    right = [(b.name, depth(second, b.name)) for b in blocks(second)]
    assert [name for name, _ in right] == [f"_blocks.{i}" for i in range(16)]
    mapped = {u["layer"] for u in atlas.units.values() if u["model"] == SECOND}
    # The second model's units are those of the blocks nearest in depth to each of the first's layers.
    nearest = [min(right, key=lambda r: abs(r[1] - depth(first, layer)))[0] for layer in LAYERS]
    assert mapped == set(nearest) and len(mapped) == 2
    assert int(nearest[0].split(".")[1]) < int(nearest[1].split(".")[1])  # deeper maps to deeper
    page = (atlas.out / "compare.html").read_text()
    assert all(f">{layer}</a>" in page for layer in (*LAYERS, *mapped))


# ---------------------------------------------------------------- in the browser


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not available():
        pytest.skip(MISSING)
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (the dev extra) is not installed")
    with sync_api.sync_playwright() as p:
        b = launch(p)
        try:
            yield b
        finally:
            b.close()


def watched(browser: Any) -> tuple[Any, list[str]]:
    """A new tab and the list its console errors, page errors and failed requests are collected in."""
    page = browser.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"failed: {r.url}"))
    return page, problems


def images_loaded(page: Any) -> tuple[int, list[str]]:
    """How many <img> the page has, and the sources of those that did not load."""
    result: tuple[int, list[str]] = tuple(page.evaluate(  # type: ignore[assignment]
        "() => { const all = Array.from(document.images);"
        " return [all.length, all.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)]; }"))
    return result


def search(page: Any, query: str) -> set[str]:
    page.fill("#search", query)
    return set(page.locator("#results li a").all_inner_texts())


def test_click_model_layer_unit_compare_then_search(atlas: Built, browser: Any, tmp_path: Path) -> None:
    page, problems = watched(browser)
    page.goto((atlas.out / "index.html").as_uri())
    page.click(f"a[href='{MODEL}/index.html']")
    page.wait_for_load_state()
    assert page.title() == MODEL and page.url.endswith(f"/{MODEL}/index.html")
    count, broken = images_loaded(page)
    assert count >= 1 and broken == []  # the first-layer filters
    assert page.locator("tr.mapped").count() == len(LAYERS)

    page.click(f"tr.mapped >> text={LAYERS[1]}")
    page.wait_for_load_state()
    assert page.title() == f"{MODEL} {LAYERS[1]}"
    assert page.locator(".grid .cell").count() == 3
    count, broken = images_loaded(page)
    assert count == 3 and broken == []

    page.click(".grid .cell >> nth=1")
    page.wait_for_load_state()
    assert page.title() == f"{MODEL} {LAYERS[1]}:1"
    count, broken = images_loaded(page)
    # 1 visualisation + 2 diverse + 3 crops + 3 photos.
    assert count == 9 and broken == [], broken
    assert "class association" in page.inner_text(".assoc")
    unit = atlas.units[f"{MODEL}/{LAYERS[1]}/1"]
    assert f"predicted: {unit['top'][0]['label']}" in page.inner_text("figure.photo >> nth=0")
    page.screenshot(path=str(tmp_path / "unit.png"), full_page=True)
    assert (tmp_path / "unit.png").stat().st_size > 10_000

    # Neighbours: the layer below, same channel.
    page.click("a[rel='layer below']")
    page.wait_for_load_state()
    assert page.title() == f"{MODEL} {LAYERS[0]}:1"

    # The comparison page: each row a layer of each model, thumbnails that load and lead to unit pages.
    page.goto((atlas.out / "index.html").as_uri())
    page.click("a[href='compare.html']")
    page.wait_for_load_state()
    assert page.title() == f"{MODEL} vs {SECOND}"
    assert page.locator("table.compare tr").count() == 1 + len(LAYERS)
    count, broken = images_loaded(page)
    assert count == 2 * len(LAYERS) * len(CHANNELS) and broken == [], broken
    page.click("table.compare tr >> nth=1 >> td >> nth=1 >> img >> nth=0")
    page.wait_for_load_state()
    assert re.fullmatch(rf"{SECOND} _blocks\.\d+:0", page.title())
    count, broken = images_loaded(page)
    assert count == 9 and broken == [], broken

    # Search: layer:channel exactly, a layer, a model, a class word; each a strict subset of the 12 units.
    every = {f"{u['model']} {u['layer']}:{u['channel']}" for u in atlas.units.values()}
    assert search(page, f"{LAYERS[1]}:2") == {f"{MODEL} {LAYERS[1]}:2"}
    page.locator("#results li a").first.click()
    page.wait_for_load_state()
    assert page.title() == f"{MODEL} {LAYERS[1]}:2"
    assert search(page, LAYERS[0]) == {f"{MODEL} {LAYERS[0]}:{c}" for c in CHANNELS}
    assert search(page, SECOND) == {x for x in every if x.startswith(SECOND)}
    word = re.split(r"[^a-z0-9]+", atlas.units[f"{MODEL}/{LAYERS[0]}/0"]["classes"][0]["label"].lower())[0]
    expected = {f"{u['model']} {u['layer']}:{u['channel']}" for u in atlas.units.values()
                if any(word in re.split(r"[^a-z0-9]+", k["label"].lower()) for k in u["classes"])}
    assert search(page, word) == expected and 0 < len(expected) < len(every)
    assert search(page, "no such class or layer") == set()
    assert problems == []


def fake_unit(layer: str, channel: int, labels: list[str]) -> dict[str, Any]:
    return {**fake_entry("m", layer, channel),
            "classes": [{"label": label, "count": 1, "probability": 0.5} for label in labels]}


def test_search_matches_whole_words_and_exact_layer_channel(browser: Any, tmp_path: Path) -> None:
    """The search box's matching, on a site whose units' classes are chosen to trip substring matching."""
    info = ModelInfo("m", "embedded", (32, 32), 5, 32, (0.5,) * 3, (0.5,) * 3, True, 1, "")
    layers = [LayerInfo(name, "Conv2d", (16, 4, 4), 1, None, False) for name in ("layer1.0", "layer10.0")]
    details = ModelDetails(info, layers, [])
    units = [fake_unit("layer1.0", 0, ["hotdog"]), fake_unit("layer1.0", 1, ["dog", "tabby cat"]),
             fake_unit("layer1.0", 2, ["tabby cat"]), fake_unit("layer10.0", 3, ["thing 7"]),
             fake_unit("layer10.0", 13, ["cup"])]
    p = plan(details, AtlasOptions("m", layers=("layer1.0", "layer10.0"), channels=(0, 1, 2, 3, 13)))
    done = {f"m/{u['layer']}/{u['channel']}": u for u in units}
    write_site(tmp_path, [p], done, [], {"m": None})
    page, problems = watched(browser)
    page.goto((tmp_path / "index.html").as_uri())

    def hits(query: str) -> set[str]:
        return {text.removeprefix("m ") for text in search(page, query)}

    assert hits("dog") == {"layer1.0:1"}  # not "hotdog"
    assert hits("hotdog") == {"layer1.0:0"}
    assert hits("cat") == hits("tabby cat") == hits("TABBY") == {"layer1.0:1", "layer1.0:2"}
    assert hits("cat layer1.0:2") == {"layer1.0:2"}  # every word must match
    assert hits("3") == set()  # a bare number is a class word: not channel 3 or 13, not "layer10.0"
    assert hits("7") == {"layer10.0:3"}
    assert hits("layer1") == hits("layer1.0") == hits("layer1.0:") == {"layer1.0:0", "layer1.0:1", "layer1.0:2"}
    assert hits("layer10.0:1") == set()  # exactly channel 1: not channel 13
    assert hits("layer10.0:13") == {"layer10.0:13"}
    assert hits("m") == {f"{u['layer']}:{u['channel']}" for u in units}  # the model's name
    assert hits("at") == hits("do") == set()  # no substrings
    assert page.locator("#results li.muted").inner_text() == "0 units"
    assert problems == []
