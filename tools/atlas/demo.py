"""`make atlas`: start a server with the embedded EfficientNet-Lite0, build a small atlas of it through the
SDK (a few channels of three layers), print the time and the load average, and optionally screenshot a
unit page with Debian's chromium (for the README).

    python -m tools.atlas.demo --out out/atlas [--screenshot docs/img/atlas_unit.png]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from convlens.client import Client
from convlens.client.atlas import MANIFEST_NAME, AtlasOptions, build_atlas
from convlens.client.atlas._plan import UnitKey
from convlens.server.launcher import ServerProcess
from tools.atlas.browser import MISSING, available, launch
from tools.common import MODEL  # the embedded Lite0

LAYERS = ("_blocks.2", "_blocks.8", "_blocks.14")  # stride 4, 16 and 32: edges, textures, parts


def screenshot(page: Path, out: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch(p)
        try:
            tab = browser.new_page(viewport={"width": 1100, "height": 900})
            tab.goto(page.resolve().as_uri())
            out.parent.mkdir(parents=True, exist_ok=True)
            tab.screenshot(path=str(out), full_page=True)
        finally:
            browser.close()
    print(f"wrote {out}")


def first_unit_page(out: Path, options: AtlasOptions) -> Path | None:
    """The page of the first unit in build order that the manifest lists as finished."""
    manifest = out / MANIFEST_NAME
    done = set(json.loads(manifest.read_text())["units"]) if manifest.exists() else set()
    return next((out / UnitKey(MODEL, layer, c).page() for layer in options.layers for c in options.channels
                 if UnitKey(MODEL, layer, c).id in done), None)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/atlas")
    p.add_argument("--channels", default="0-3")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--jobs", type=int, default=6)
    p.add_argument("--screenshot", type=Path, help="PNG of a unit page (needs chromium and playwright)")
    args = p.parse_args()
    from convlens.client.atlas import parse_channels

    options = AtlasOptions(MODEL, layers=LAYERS, channels=parse_channels(args.channels), steps=args.steps,
                           size=args.size, jobs=args.jobs)
    log = Path(args.out) / "server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with ServerProcess(["--device", "cpu"], log_path=log) as server:
        started = time.monotonic()
        with Client(server.address, timeout=900) as client:
            report = build_atlas(client, args.out, options)
        seconds = time.monotonic() - started
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"atlas of {MODEL}: {report.units} units ({report.computed} computed, {report.reused} reused) "
          f"in {seconds:.0f} s on {os.cpu_count()} cores; load average {load}; "
          f"{report.class_predictions} class predictions")
    print(f"open {Path(args.out) / 'index.html'}")
    if args.screenshot:
        page = first_unit_page(Path(args.out), options)
        if not available():
            print(f"no screenshot: {MISSING}", file=sys.stderr)
        elif page is None:
            print("no screenshot: no unit is finished", file=sys.stderr)
        else:
            screenshot(page, args.screenshot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
