"""tools/common.py: the one module the developer tools share (photos, reports, figures)."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from tools.common import figure, load_average, photo, png, record, sheet, table


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
    with Image.open(tmp_path / "red.png") as saved:
        assert saved.getpixel((0, 0)) == (255, 0, 0)


def test_sheet_lays_out_a_captioned_grid() -> None:
    red, blue = Image.new("RGB", (100, 50), "red"), Image.new("RGB", (20, 40), "blue")
    grid = sheet([[("r", red), ("b", blue)], [("r", red)]], cell=50)
    assert grid.size == (2 * 54, 2 * 68)
    assert grid.getpixel((10, 16 + 10)) == (255, 0, 0)  # the red one, scaled to 50 x 25, under its caption
    assert grid.getpixel((54 + 5, 16 + 20)) == (0, 0, 255)


def test_table_aligns_each_column_when_asked() -> None:
    assert table(["n", "name"], [(8, "x")], ["---:", "---"]) == ["| n | name |", "| ---: | --- |", "| 8 | x |"]


def test_load_average_is_the_machines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.getloadavg", lambda: (1.234, 0.5, 12.0))
    assert load_average() == "1.23 / 0.50 / 12.00"
    assert load_average(sep=" ") == "1.23 0.50 12.00"  # tools/bench/http_front.py's line
    assert load_average(count=1) == "1.23"  # tools/reliability/budget.py's line


def test_png_round_trips_the_photo() -> None:
    array = photo("coffee", 32)
    with Image.open(io.BytesIO(png(array))) as decoded:
        assert decoded.format == "PNG"
        np.testing.assert_array_equal(np.asarray(decoded.convert("RGB")), array)


def test_importing_the_common_module_costs_no_torch() -> None:
    """A plain gRPC client tool (tools/reliability/first_calls.py) takes MODEL from here: no torch import."""
    code = "import sys, tools.common; assert 'torch' not in sys.modules and 'convlens.server' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


def test_the_peers_tables_are_the_hand_written_markdown() -> None:
    """tools/peers/bench.py builds its tables with `table` now; the Markdown is what it printed before."""
    from tools.peers.bench import table as peers_table

    result = {"summary": {
        "saliency": {"8": {"convlens": {"rps": 10.0, "p50_ms": 80.4, "p99_ms": 120.6,
                                        "server_cpu_ms_per_answer": 55.5},
                           "plain": {"rps": 8.5, "p50_ms": 90.0, "p99_ms": 150.0, "server_cpu_ms_per_answer": 60.0,
                                     "convlens_ratio": 1.176}}},
        "maximize": {"convlens": {"wall_s": 12.34}, "plain": {"wall_s": 20.0, "convlens_speedup": 1.62}},
        "service_over_raw": {"8": {"convlens": 1.1, "plain": 1.25}},
        "raw": {"best": "2 threads"},
        "efficiency": {"concurrency": 8, "convlens_cpu_ms_per_image": 55.5, "raw_best_cpu_ms_per_image": 50.0,
                       "ratio_to_raw_best": 1.11, "ratio_to_raw_cheapest": 1.2}}}
    assert peers_table(result).split("\n") == [
        "| concurrency | server | req/s | p50 ms | p99 ms | server CPU-ms / answer | ConvLens / this |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
        "| 8 | convlens | 10.00 | 80 | 121 | 55.5 | — |",
        "| 8 | plain | 8.50 | 90 | 150 | 60.0 | 1.18 |",
        "",
        "| 8 MaximizeUnit jobs at once | wall s | ConvLens speed-up |",
        "| --- | ---: | ---: |",
        "| convlens | 12.3 | — |",
        "| plain | 20.0 | 1.62x |",
        "",
        "| concurrency | convlens / raw best | plain / raw best |",
        "| ---: | ---: | ---: |",
        "| 8 | 1.10 | 1.25 |",
        "",
        "Server CPU per image at c8: ConvLens 55.5 CPU-ms; raw torch's best configuration (2 threads) 50.0: "
        "**1.11x** (1.20x the cheapest raw configuration).",
    ]
