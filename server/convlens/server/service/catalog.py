"""ListModels and GetModel: what is served, and one model's layer catalog."""

from __future__ import annotations

from convlens.server.models.model import ServedModel
from convlens.server.service.context import ServiceContext


class CatalogService:
    def __init__(self, context: ServiceContext) -> None:
        self.repository = context.repository

    def list_models(self) -> list[ServedModel]:
        return self.repository.models()

    def get_model(self, name: str) -> ServedModel:
        return self.repository.get(name)
