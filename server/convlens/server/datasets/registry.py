"""The datasets a server (or `convlens index build`) knows by name."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from convlens.server.datasets.dataset import Dataset, DirectoryDataset, SamplesDataset
from convlens.server.errors import NotFound

DEFAULT_DATASET = "samples"


def parse_dataset_spec(text: str) -> tuple[str, Path]:
    """NAME=DIR -> (name, dir); ValueError naming what is wrong (the caller turns it into a usage error)."""
    name, sep, folder = text.partition("=")
    name = name.strip()
    if not sep or not name or not folder:
        raise ValueError(f"expected NAME=DIR, got {text!r}")
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ValueError(f"dataset name {name!r}: use letters, digits, '-', '_' or '.'")
    return name, Path(folder).expanduser()


class DatasetRegistry:
    def __init__(self, datasets: Iterable[Dataset] = ()) -> None:
        self._datasets: dict[str, Dataset] = {}
        for d in datasets:
            if d.name in self._datasets:
                raise ValueError(f"two datasets named {d.name!r}")
            self._datasets[d.name] = d

    @classmethod
    def from_specs(cls, specs: Iterable[tuple[str, Path]], *, samples: bool = True) -> DatasetRegistry:
        """The embedded `samples` plus one per NAME=DIR; a DIR that does not exist is an error here."""
        datasets: list[Dataset] = [SamplesDataset()] if samples else []
        for name, folder in specs:
            if not Path(folder).is_dir():
                raise FileNotFoundError(f"--dataset {name}={folder}: {folder} is not a directory")
            datasets.append(DirectoryDataset(name, Path(folder)))
        return cls(datasets)

    def get(self, name: str) -> Dataset:
        d = self._datasets.get(name or DEFAULT_DATASET)
        if d is None:
            raise NotFound(f"no dataset {name!r}; datasets: {', '.join(self._datasets) or 'none'} "
                           "(add one with --dataset NAME=DIR)", field="dataset", reason="DATASET_NOT_FOUND")
        return d

    def names(self) -> list[str]:
        return list(self._datasets)

    def datasets(self) -> list[Dataset]:
        return list(self._datasets.values())
