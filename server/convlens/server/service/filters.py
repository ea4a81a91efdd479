"""GetFilters: a conv layer's weights (and their grid picture), read on a worker."""

from __future__ import annotations

from convlens.server.errors import InvalidArgument
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
        spec = model.layer(query.layer)
        if not spec.has_filters:
            raise InvalidArgument(
                f"layer {query.layer!r} of {model_name!r} is a {spec.type}, which has no convolution weights; "
                "choose a layer with has_filters = true (`convlens layers MODEL`)",
                field="layer",
            )
        task = Task(model=model.name, rpc="GetFilters", key=query, payload=query,
                    compute=compute_filters, deadline=deadline)
        answer: FiltersAnswer = await self.scheduler.submit(task)
        return answer
