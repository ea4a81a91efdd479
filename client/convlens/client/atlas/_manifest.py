"""The build's memory: which units are finished, and what was learnt about each, in one JSON file.

Written atomically (a temporary file in the same folder, then `os.replace`) after every finished unit, so a
build stopped at any moment — Ctrl-C, a kill, a crash — leaves either the old or the new manifest, never a
torn one, and a restarted build skips every unit it lists. A unit's images are written before its entry, so
an entry never points at a missing file.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

VERSION = 2  # 2: classes predicted on the photo itself (1 used a unit's boxed copy): version 1 is recomputed
NAME = "atlas-manifest.json"


class Manifest:
    def __init__(self, root: Path, signature: dict[str, object]) -> None:
        self.path = root / NAME
        self.signature = signature
        self._lock = threading.Lock()
        self.units: dict[str, dict[str, Any]] = {}
        self.models: dict[str, dict[str, Any]] = {}
        self.reused = 0  # units found finished when the build started
        if self.path.exists():
            data = json.loads(self.path.read_text())
            if data.get("version") == VERSION and data.get("signature") == signature:
                self.units = dict(data.get("units", {}))
                self.models = dict(data.get("models", {}))
                self.reused = len(self.units)

    def done(self, unit_id: str) -> bool:
        with self._lock:
            return unit_id in self.units

    def record(self, unit_id: str, entry: dict[str, Any]) -> None:
        with self._lock:
            self.units[unit_id] = entry
            self._write()

    def record_model(self, name: str, entry: dict[str, Any]) -> None:
        with self._lock:
            self.models[name] = entry
            self._write()

    def _write(self) -> None:
        data = {"version": VERSION, "signature": self.signature, "models": self.models, "units": self.units}
        fd, tmp = tempfile.mkstemp(prefix=".manifest-", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
