"""GetFilters: a conv layer's weights (and their grid picture), read on a worker."""

from __future__ import annotations

from dataclasses import dataclass

from convlens.server.compute.filters import FiltersAnswer, FiltersPayload, compute_filters
from convlens.server.errors import InvalidArgument
from convlens.server.scheduler.task import Task
from convlens.server.service.context import ServiceContext


@dataclass(frozen=True)
class FiltersQuery(FiltersPayload):
    """A GetFilters request: the payload computed on a worker, checked here first."""

    def validate(self) -> None:
        if not 1 <= self.max_filters <= 1024:
            raise InvalidArgument("max_filters must be in 1..1024 (0 means the default, 64)", field="max_filters")
        if not 1 <= self.max_input_channels <= 256:
            raise InvalidArgument("max_input_channels must be in 1..256 (0 means the default, 16)",
                                  field="max_input_channels")
        if self.cell_scale is not None and not 1 <= self.cell_scale <= 64:
            raise InvalidArgument("cell_scale must be in 1..64 (0 means automatic)", field="cell_scale")


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
        answer: FiltersAnswer = await self.scheduler.submit(task)
        return answer
