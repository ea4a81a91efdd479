"""Where `make bench`'s runs go: inserted under a marker in docs/performance.md, newest first."""

from __future__ import annotations

from pathlib import Path


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
