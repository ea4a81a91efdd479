"""The models a server serves: the embedded default plus one per folder of --model-repo.

A folder that cannot be loaded is recorded in `failures` (folder name -> reason) and logged; the
other models are still served.
"""

from __future__ import annotations

import logging
from pathlib import Path

from convlens.server.errors import NotFound, echo
from convlens.server.models.embedded import load_embedded
from convlens.server.models.loaders import ModelConfigError, load_folder
from convlens.server.models.model import ServedModel

log = logging.getLogger("convlens.models")


class ModelRepository:
    def __init__(self, models: list[ServedModel] | None = None,
                 failures: dict[str, str] | None = None) -> None:
        self._models: dict[str, ServedModel] = {}
        self.failures: dict[str, str] = dict(failures or {})
        for model in models or []:
            self.add(model)

    @classmethod
    def load(cls, model_repo: Path | None, *, include_embedded: bool = True) -> ModelRepository:
        repo = cls()
        if include_embedded:
            models, failures = load_embedded()
            for model in models:
                repo.add(model)
            repo.failures.update(failures)
        if model_repo is not None:
            model_repo = Path(model_repo)
            if not model_repo.is_dir():
                raise FileNotFoundError(f"--model-repo {model_repo} is not a directory")
            for folder in sorted(p for p in model_repo.iterdir() if p.is_dir()):
                if folder.name.startswith("."):
                    continue
                repo._load_folder(folder)
        log.info("serving %d model(s): %s", len(repo._models), ", ".join(repo.names()) or "none")
        return repo

    def _load_folder(self, folder: Path) -> None:
        name = folder.name
        if name in self._models:
            self._fail(name, f"a model named {name!r} is already served (embedded or earlier folder)")
            return
        try:
            model = load_folder(folder)
        except Exception as exc:
            # One broken folder must not take the others down; the reason goes to logs and failures.
            reason = str(exc) if isinstance(exc, ModelConfigError) else f"{type(exc).__name__}: {exc}"
            self._fail(name, reason)
            return
        self.add(model)
        log.info("loaded model %s (%s, %d layers)", name, model.format, len(model.layers))

    def _fail(self, name: str, reason: str) -> None:
        self.failures[name] = reason
        log.error("model folder %s not served: %s", name, reason)

    def add(self, model: ServedModel) -> None:
        if model.name in self._models:
            raise ValueError(f"duplicate model name {model.name!r}")
        self._models[model.name] = model

    def get(self, name: str) -> ServedModel:
        try:
            return self._models[name]
        except KeyError:
            raise NotFound(f"no model {echo(name)}; served models: {', '.join(self.names()) or 'none'}",
                           field="model") from None

    def names(self) -> list[str]:
        return list(self._models)

    def models(self) -> list[ServedModel]:
        return list(self._models.values())

    def __contains__(self, name: object) -> bool:
        return name in self._models

    def __len__(self) -> int:
        return len(self._models)
