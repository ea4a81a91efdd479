"""The atlas in a real browser: Debian's chromium, driven by Playwright, opens an atlas of a small model
built through the SDK from a test server, clicks model -> layer -> unit, checks every image loaded and no
console error, uses the search box, and saves a screenshot.

Skipped only where Debian's chromium is not installed (`apt-get install -y chromium`; `make test` installs
it when it runs as root) or Playwright is missing; never `playwright install` (no download happens).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from convlens.client import Client
from convlens.client.atlas import MANIFEST_NAME, AtlasOptions, build_atlas
from convlens.server.launcher import ServerProcess

pytestmark = pytest.mark.slow
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MODEL = "resnet18"  # the e2e repository's small torchvision net (10 classes at 64 px)
LAYERS = ("layer1.0", "layer2.0")

if not os.access(CHROMIUM, os.X_OK):
    pytest.skip("Debian's chromium is not installed (apt-get install -y chromium; make test does it as root)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (the dev extra) is not installed")


@pytest.fixture(scope="module")
def atlas(server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("atlas")
    options = AtlasOptions(MODEL, layers=LAYERS, channels=(0, 1, 2), steps=8, size=32, jobs=3, top_k=3,
                           diverse_images=2)
    with Client(server.address, timeout=120) as client:
        report = build_atlas(client, out, options, progress=None)
    assert report.computed == 6
    return out


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield b
        finally:
            b.close()


def images_loaded(page: Any) -> tuple[int, list[str]]:
    """How many <img> the page has, and the sources of those that did not load."""
    result: tuple[int, list[str]] = tuple(page.evaluate(  # type: ignore[assignment]
        "() => { const all = Array.from(document.images);"
        " return [all.length, all.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)]; }"))
    return result


def test_click_model_layer_unit_then_search(atlas: Path, browser: Any, tmp_path: Path) -> None:
    page = browser.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"failed: {r.url}"))

    page.goto((atlas / "index.html").as_uri())
    page.click(f"text={MODEL}")
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
    page.screenshot(path=str(tmp_path / "unit.png"), full_page=True)
    assert (tmp_path / "unit.png").stat().st_size > 10_000

    # Neighbours: the layer below, same channel.
    page.click("a[rel='layer below']")
    page.wait_for_load_state()
    assert page.title() == f"{MODEL} {LAYERS[0]}:1"

    # Search by layer:channel, then by a class association read from the manifest.
    page.fill("#search", f"{LAYERS[1]}:2")
    hits = page.locator("#results li a")
    assert hits.count() == 1 and hits.first.inner_text() == f"{MODEL} {LAYERS[1]}:2"
    hits.first.click()
    page.wait_for_load_state()
    assert page.title() == f"{MODEL} {LAYERS[1]}:2"
    units = json.loads((atlas / MANIFEST_NAME).read_text())["units"]
    label = next(e["classes"][0]["label"] for e in units.values() if e["classes"])
    expected = {f"{MODEL} {e['layer']}:{e['channel']}" for e in units.values()
                if any(k["label"] == label for k in e["classes"])}
    page.fill("#search", label)
    found = set(page.locator("#results li a").all_inner_texts())
    assert found == expected
    page.fill("#search", "no such class or layer")
    assert page.locator("#results li a").count() == 0
    assert problems == []
