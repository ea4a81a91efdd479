"""Datasets: stable ids and digests, unreadable files skipped and counted, start-up refuses a missing folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convlens.server.config import from_args
from convlens.server.datasets import DatasetRegistry, DirectoryDataset, SamplesDataset, parse_dataset_spec
from convlens.server.errors import NotFound


def _photo(path: Path, seed: int, size: tuple[int, int] = (40, 60)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


def test_folder_ids_are_relative_paths_with_content_digests(tmp_path: Path) -> None:
    _photo(tmp_path / "b" / "x.png", 1)
    _photo(tmp_path / "a.PNG", 2)
    _photo(tmp_path / "c.webp", 3)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    d = DirectoryDataset("mine", tmp_path)
    listing = d.listing()
    assert [i.path for i in listing.images] == ["a.PNG", "b/x.png", "c.webp"]
    assert list(listing.skipped) == ["bad.jpg"]
    assert d.read(listing.images[1]).shape == (40, 60, 3) and d.size(listing.images[1]) == (40, 60)
    # Same contents elsewhere: same ids, same digest (nothing depends on the folder or on timestamps).
    copy = tmp_path.parent / (tmp_path.name + "_copy")
    for img in listing.images:
        (copy / img.path).parent.mkdir(parents=True, exist_ok=True)
        (copy / img.path).write_bytes((tmp_path / img.path).read_bytes())
    assert DirectoryDataset("other", copy).listing().digest == listing.digest
    # A changed file changes its id's digest and the dataset digest; refresh re-hashes it.
    _photo(tmp_path / "b" / "x.png", 9)
    refreshed = d.refresh()
    assert refreshed.digest != listing.digest
    assert [i.path for i in refreshed.images] == [i.path for i in listing.images]
    assert refreshed.images[1].digest != listing.images[1].digest and refreshed.images[0] == listing.images[0]


def test_samples_are_real_photos_shipped_in_packages() -> None:
    listing = SamplesDataset().listing()
    paths = {i.path for i in listing.images}
    assert {"skimage/chelsea.png", "skimage/coffee.png", "sklearn/china.jpg"} <= paths
    assert len(paths) >= 15 and not listing.skipped
    assert SamplesDataset().listing().digest == listing.digest


def test_registry_names_datasets_in_not_found(tmp_path: Path) -> None:
    reg = DatasetRegistry.from_specs([("photos", tmp_path)])
    assert reg.get("").name == "samples"
    with pytest.raises(NotFound, match="datasets: samples, photos") as e:
        reg.get("imagenet")
    assert e.value.violations[0].field == "dataset"
    with pytest.raises(FileNotFoundError, match="not a directory"):
        DatasetRegistry.from_specs([("gone", tmp_path / "gone")])


def test_start_up_stops_on_a_missing_dataset_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = from_args(["--dataset", f"a={tmp_path}", "--index-dir", str(tmp_path / "i")])
    assert cfg.datasets == (("a", tmp_path),) and cfg.index_dir == tmp_path / "i"
    monkeypatch.setenv("CONVLENS_DATASET", f"b={tmp_path}")
    assert [n for n, _ in from_args([]).datasets] == ["b"]
    with pytest.raises(SystemExit):
        from_args(["--dataset", f"c={tmp_path / 'missing'}"])
    assert f"{tmp_path / 'missing'} is not a directory" in capsys.readouterr().err
    with pytest.raises(ValueError, match="NAME=DIR"):
        parse_dataset_spec("nodir")


def test_listing_the_samples_decodes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first ListDatasets took ~4 s decoding 19 photos; a listing now reads the shipped files' bytes (their
    content digests) and decodes an image only when it is read."""
    import hashlib

    from convlens.server.datasets import dataset as ds

    decoded: list[str] = []
    loaders = dict(ds.SAMPLES)

    def counting(path: str):  # type: ignore[no-untyped-def]
        def load() -> np.ndarray:
            decoded.append(path)
            return loaders[path]()
        return load

    monkeypatch.setattr(ds, "SAMPLES", {p: counting(p) for p in loaders})
    samples = SamplesDataset()
    listing = samples.listing()
    assert decoded == [] and len(listing.images) == 19 and not listing.skipped
    coffee = next(i for i in listing.images if i.path == "skimage/coffee.png")
    file = ds.sample_file("skimage/coffee.png")
    assert file is not None and coffee.digest == hashlib.sha256(file.read_bytes()).hexdigest()[:32]
    pixels = samples.read(coffee)
    assert decoded == ["skimage/coffee.png"] and pixels.shape == (400, 600, 3) and pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels, np.asarray(Image.open(file).convert("RGB")))  # the same file's pixels
    samples.read(coffee)
    assert decoded == ["skimage/coffee.png"]  # decoded once
