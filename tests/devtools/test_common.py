"""tools/common.py: the one module the developer tools share (photos, reports, figures)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from tools.common import figure, photo, record, sheet, table


def test_photo_is_the_shipped_photo_as_rgb() -> None:
    """Checked against scikit-image itself: colour photos unchanged, grey ones repeated to three channels."""
    np.testing.assert_array_equal(photo("chelsea"), skimage.data.chelsea())
    brick = photo("brick")
    assert brick.shape == (*skimage.data.brick().shape, 3) and brick.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(brick[:, :, c], skimage.data.brick())
    assert photo("coffee", 48).shape == (48, 48, 3)


def test_an_unknown_photo_names_the_known_ones() -> None:
    with pytest.raises(KeyError, match="chelsea"):
        photo("no_such_photo")


def test_record_inserts_newest_first_under_the_marker(tmp_path: Path) -> None:
    doc = tmp_path / "perf.md"
    doc.write_text("# Performance\n\nintro\n\n<!-- m -->\n\nold run\n\n## later section\n")
    record(doc, "run one", "<!-- m -->")
    record(doc, "run two", "<!-- m -->")
    text = doc.read_text()
    assert text.index("intro") < text.index("<!-- m -->") < text.index("run two") < text.index("run one") \
        < text.index("old run") < text.index("## later section")
    assert text.count("<!-- m -->") == 1


def test_record_appends_marker_and_section_to_a_file_without_them(tmp_path: Path) -> None:
    doc = tmp_path / "perf.md"
    doc.write_text("# Performance\n\nintro\n")
    record(doc, "first run", "<!-- new -->", "A new bench")
    text = doc.read_text()
    assert text.index("intro") < text.index("## A new bench") < text.index("<!-- new -->") < text.index("first run")


def test_table_is_markdown() -> None:
    assert table(["a", "b"], [(1, "x"), (2.5, "y")]) == ["| a | b |", "| --- | --- |", "| 1 | x |", "| 2.5 | y |"]


def test_figure_saves_the_picture_it_shows(tmp_path: Path) -> None:
    html = figure(tmp_path, "red.png", Image.new("RGB", (4, 3), "red"), "a <red> square", 64)
    assert "src='red.png'" in html and "height=64" in html and "a &lt;red&gt; square" in html
    assert Image.open(tmp_path / "red.png").getpixel((0, 0)) == (255, 0, 0)


def test_sheet_lays_out_a_captioned_grid() -> None:
    red, blue = Image.new("RGB", (100, 50), "red"), Image.new("RGB", (20, 40), "blue")
    grid = sheet([[("r", red), ("b", blue)], [("r", red)]], cell=50)
    assert grid.size == (2 * 54, 2 * 68)
    assert grid.getpixel((10, 16 + 10)) == (255, 0, 0)  # the red one, scaled to 50 x 25, under its caption
    assert grid.getpixel((54 + 5, 16 + 20)) == (0, 0, 255)
