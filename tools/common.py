"""What the developer tools share: the model they run on, the photos, figures, and reports.

Benches (`tools/bench/`), the demo (`tools/demo/`) and the quality tools (`tools/quality/`) all run on the
embedded EfficientNet-Lite0 and the photos that ship inside scikit-image and scikit-learn (the server's
`samples` dataset reads the same ones). Benches write Markdown reports into docs/performance.md with
`record`, under a marker, newest first, each with its date and the machine's load average.

Importing it costs neither torch nor the server (both are imported where used), so a plain gRPC client tool
can take `MODEL` and `load_average` from here.
"""

from __future__ import annotations

import argparse
import html
import io
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

MODEL = "efficientnet_lite0"  # the embedded default every tool runs on


# ---------------------------------------------------------------- photos


def photo(name: str, side: int | None = None) -> np.ndarray:
    """An embedded photo by short name ("chelsea", "china", "brick"...) as RGB uint8 [H, W, 3] (grey ones
    repeated to three channels); resized to side x side when `side` is given."""
    from convlens.server.datasets.dataset import sample_photo

    array = sample_photo(name)
    if side is not None:
        array = np.asarray(Image.fromarray(array).resize((side, side), Image.Resampling.LANCZOS))
    return array


def png(array: np.ndarray) -> bytes:
    """An RGB uint8 [H, W, 3] array as PNG bytes (Pillow's default compression): a request's image."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- figures


def figure(out: Path, name: str, image: Image.Image, caption: str, height: int = 192) -> str:
    """Save `image` as out/name and return the HTML figure that shows it with its caption."""
    image.save(out / name)
    return (f"<figure><img src='{html.escape(name)}' height={height}><figcaption>{html.escape(caption)}"
            "</figcaption></figure>")


def sheet(rows: Sequence[Sequence[tuple[str, Image.Image]]], cell: int = 224) -> Image.Image:
    """A grid of captioned pictures, each scaled to `cell` on its longest side."""
    cols = max(len(r) for r in rows)
    out = Image.new("RGB", (cols * (cell + 4), len(rows) * (cell + 18)), "white")
    draw = ImageDraw.Draw(out)
    for i, row in enumerate(rows):
        for j, (caption, img) in enumerate(row):
            im = img.copy()
            im.thumbnail((cell, cell))
            x, y = j * (cell + 4), i * (cell + 18)
            out.paste(im, (x, y + 16))
            draw.text((x + 2, y + 2), caption, fill="black")
    return out


# ---------------------------------------------------------------- reports


def load_average(sep: str = " / ", count: int = 3) -> str:
    """The 1/5/15-minute load average (the first `count` of them), as reports state it beside every figure."""
    return sep.join(f"{x:.2f}" for x in os.getloadavg()[:count])


def utc_now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def table(header: Sequence[str], rows: Iterable[Sequence[object]], align: str | Sequence[str] = "---") -> list[str]:
    """A Markdown table's lines (cells already formatted as text, or anything `str` shows well); `align` is one
    marker for every column or one per column ("---:" right-aligns)."""
    aligns = [align] * len(header) if isinstance(align, str) else list(align)
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(aligns) + " |",
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]


def bench_parser(doc: str | None) -> argparse.ArgumentParser:
    """The arguments every bench that records a report takes: where the report goes, and the device."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("docs/performance.md"), help="the Markdown file to record into")
    import torch

    p.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    return p


def record(path: Path, text: str, marker: str, section: str | None = None) -> None:
    """Insert `text` right under `marker` (everything else in the file stays). A file without the marker gets
    it appended, under a `## section` heading when one is given."""
    previous = path.read_text() if path.exists() else "# Performance\n"
    if marker not in previous:
        heading = f"## {section}\n\n" if section else ""
        previous = previous.rstrip("\n") + f"\n\n{heading}{marker}\n"
    head, _, tail = previous.partition(marker)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{head}{marker}\n\n{text}\n{tail.lstrip(chr(10))}")
