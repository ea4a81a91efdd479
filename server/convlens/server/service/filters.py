"""GetFilters: a conv layer's weights (and their grid picture), read on a worker."""

from __future__ import annotations

from convlens.server.ops.filters import FiltersAnswer, FiltersQuery, compute_filters
from convlens.server.scheduler.task import Task
from convlens.server.service.context import ServiceContext


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
