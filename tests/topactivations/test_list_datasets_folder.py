"""ListDatasets answers at once for a --dataset folder never listed before: its image files by name (no file
read or hashed, an empty digest), while the real listing (every file read and hashed) is made in the
background; once made, the answer is that listing, equal to one made independently."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convlens.client import AsyncClient
from convlens.server.app import ConvLensServer
from convlens.server.config import ServerConfig
from convlens.server.datasets import DirectoryDataset
from convlens.server.datasets.dataset import Listing
from convlens.server.models.repository import ModelRepository
from tests.streaming.conftest import tiny_model


async def test_a_folder_is_listed_by_name_at_once_then_hashed_in_the_background(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i, name in enumerate(("a.png", "sub/b.jpg", "c.webp")):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(folder / name)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")  # found by name; the real listing skips it
    (folder / "notes.txt").write_text("not an image")
    expected = DirectoryDataset("independent", folder).listing()

    hashing, gate = threading.Event(), threading.Event()
    real = DirectoryDataset._list

    def gated(self: DirectoryDataset) -> Listing:
        hashing.set()
        assert gate.wait(60), "the test never let the listing go on"
        return real(self)

    monkeypatch.setattr(DirectoryDataset, "_list", gated)
    srv = ConvLensServer(ServerConfig(host="127.0.0.1", port=0, metrics=False, embedded=False, device="cpu",
                                      grace_seconds=0.0, datasets=(("photos", folder),), index_dir=tmp_path / "idx"),
                         repository=ModelRepository([tiny_model()]))
    await srv.start()
    try:
        async with AsyncClient(f"127.0.0.1:{srv.port}", timeout=60) as c:
            async def photos() -> tuple[int, int, str, int]:
                d = next(d for d in await c.list_datasets() if d.name == "photos")
                return d.image_count, d.skipped_count, d.digest, len(d.indexes)

            assert await photos() == (4, 0, "", 0)  # the four image names, nothing read
            assert await asyncio.to_thread(hashing.wait, 60)  # the real listing started in the background
            assert await photos() == (4, 0, "", 0)  # still answered at once while it runs
            gate.set()
            for _ in range(6000):  # until the background listing is done (observable: the digest)
                listed = await photos()
                if listed[2]:
                    break
                await asyncio.sleep(0.01)
            assert listed == (3, 1, expected.digest, 0)
    finally:
        gate.set()
        await srv.stop(0.0)
