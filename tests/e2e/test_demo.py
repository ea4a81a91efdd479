"""The demo's wiring (tools/demo): every section through the SDK against the session's real server, with
every feature of the gallery profile (guided dream, softening pair, all presets, logits units) at toy sizes."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from convlens.client import Client
from tools.demo.__main__ import SALIENCY_METHODS, write_page
from tools.demo.profile import GALLERY, PRESETS

pytestmark = pytest.mark.slow

TOY = replace(GALLERY, name="toy", smoothgrad_samples=2, ig_steps=2,
              units=(("_blocks.2", "early", (3,)), ("_fc", "logits", (1,))),
              dreams=(("chelsea", "_blocks.3"),), dream_size=64, dream_steps=2,
              styles=(("coffee", "brick"),), style_size=48, style_steps=2,
              classes=(1,), channels=(("_blocks.2", (3,)),), maximize_steps=2, maximize_size=48)


def test_the_demo_writes_every_section_and_every_picture_it_shows(client: Client, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    page = write_page(client, TOY, tmp_path).read_text()
    for heading in ("Models served", "First-layer filters", "Saliency", "Units", "DeepDream", "Style transfer",
                    "Softening", "MaximizeUnit"):
        assert f"<h2>{heading}" in page or f"<h3>{heading}" in page, heading
    shown = set(re.findall(r"src='([^']+)'", page))
    assert shown, "the page shows pictures"
    for name in shown:
        with Image.open(tmp_path / name) as picture:  # every picture the page shows was written, and is one
            assert picture.width > 0 and picture.height > 0, name
    assert {f"saliency_{m}.png" for m in SALIENCY_METHODS} <= shown
    assert {f"max_{p}_1.png" for p in PRESETS} | {"max__blocks_2_3.png", "dream_guided.png",
                                                   "soften_none.png", "soften_channels.png",
                                                   "unit__fc_1.png"} <= shown
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert [line.split("]")[0] for line in lines] == [f"[{i}/7" for i in range(1, 8)], lines
