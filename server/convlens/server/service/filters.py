"""GetFilters: a conv layer's weights (and their grid picture), read on a worker."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from convlens.server.compute.filters import FiltersPayload, FiltersResult, compute_filters
from convlens.server.engine.filters import FilterWeights
from convlens.server.errors import Violations
from convlens.server.scheduler.task import Task
from convlens.server.service.context import ServiceContext


@dataclass(frozen=True)
class FiltersQuery(FiltersPayload):
    """A GetFilters request: the payload computed on a worker, checked here first."""

    def validate(self) -> None:
        v = Violations()
        v.check(1 <= self.max_filters <= 1024, "max_filters", "max_filters must be in 1..1024 (unset: the default, 64)")
        v.check(1 <= self.max_input_channels <= 256, "max_input_channels",
                "max_input_channels must be in 1..256 (unset: the default, 16)")
        v.check(self.cell_scale is None or 1 <= self.cell_scale <= 64, "cell_scale",
                "cell_scale must be in 1..64 (unset: automatic)")
        v.raise_if_any()


@dataclass
class FiltersAnswer:
    """A GetFilters answer: the layer's weights (and facts) and, when asked, their grid picture."""

    filters: FilterWeights
    grid: Image.Image | None


class FiltersService:
    def __init__(self, context: ServiceContext) -> None:
        self.repository = context.repository
        self.scheduler = context.scheduler

    async def __call__(self, model_name: str, query: FiltersQuery, deadline: float | None) -> FiltersAnswer:
        model = self.repository.get(model_name)
        query.validate()
        model.resolver.conv(query.layer, field="layer")  # not found / no weights, before any queueing
        task = Task(model=model.name, rpc="GetFilters", key=query, payload=query,
                    compute=compute_filters, deadline=deadline, served=model)
        result: FiltersResult = await self.scheduler.submit(task)
        return FiltersAnswer(*result)
