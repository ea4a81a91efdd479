"""What a builder process needs to recreate by itself: a model and a dataset from their names.

`convlens index build` runs without a server (and Ray actors run in other processes), so the model and
the dataset are described by small picklable specs and loaded where they are used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from convlens.server.datasets.dataset import Dataset
from convlens.server.datasets.registry import DatasetRegistry
from convlens.server.models.model import ServedModel


@dataclass(frozen=True)
class ModelSource:
    name: str
    model_repo: Path | None = None

    def load(self) -> ServedModel:
        from convlens.server.models.efficientnet_lite import VARIANTS

        if self.model_repo is not None and (Path(self.model_repo) / self.name).is_dir():
            from convlens.server.models.loaders import load_folder

            return load_folder(Path(self.model_repo) / self.name)
        if self.name in VARIANTS:
            from convlens.server.models.embedded import load_lite

            return load_lite(self.name)
        where = f"--model-repo {self.model_repo}" if self.model_repo else "no --model-repo given"
        raise LookupError(f"no model {self.name!r}: not an embedded model ({', '.join(VARIANTS)}) and not a "
                          f"folder of the model repository ({where})")


@dataclass(frozen=True)
class DatasetSource:
    name: str
    folders: tuple[tuple[str, Path], ...] = ()  # the --dataset NAME=DIR pairs known to the builder

    def load(self) -> Dataset:
        return DatasetRegistry.from_specs(self.folders).get(self.name)
