"""Debian's chromium, driven by Playwright (from PyPI, no browser download): the one place its path and
launch flags are written, for `make atlas`'s screenshot and the atlas browser test."""

from __future__ import annotations

import os
from typing import Any

CHROMIUM = "/usr/bin/chromium"
# Headless and offline: no sandbox (containers run as root), no GPU, nothing fetched in the background.
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MISSING = "Debian's chromium is not installed (apt-get install -y chromium; make test does it as root)"


def available() -> bool:
    return os.access(CHROMIUM, os.X_OK)


def launch(playwright: Any) -> Any:
    """A headless Browser of the system chromium (`playwright` from sync_playwright())."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
