"""The application service: what each RPC does, in domain terms (no grpc, no protobuf).

One module per RPC. Each holds a small class built from the shared `ServiceContext` (the model
repository and the scheduler); the transport converts messages to its calls and back. Compute goes through
the scheduler. `Services` gathers them for the servicer; an RPC that lands adds one field here and one
handler in transport/servicer.py. See docs/architecture.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from convlens.server.service.catalog import CatalogService
from convlens.server.service.context import ServiceContext
from convlens.server.service.dream import DreamService
from convlens.server.service.filters import FiltersService
from convlens.server.service.maximize import MaximizeService
from convlens.server.service.model_control import ModelControl
from convlens.server.service.saliency import SaliencyService
from convlens.server.service.style import StyleService
from convlens.server.service.top_activations import TopActivationsService


@dataclass
class Services:
    context: ServiceContext
    catalog: CatalogService
    filters: FiltersService
    saliency: SaliencyService
    top_activations: TopActivationsService
    maximize: MaximizeService
    dream: DreamService
    style: StyleService
    model_control: ModelControl

    @classmethod
    def build(cls, context: ServiceContext) -> Services:
        return cls(
            context=context,
            catalog=CatalogService(context),
            filters=FiltersService(context),
            saliency=SaliencyService(context),
            top_activations=TopActivationsService(context),
            maximize=MaximizeService(context),
            dream=DreamService(context),
            style=StyleService(context),
            model_control=ModelControl(
                context, mode=getattr(context.config, "model_control", "none"),
                poll_s=getattr(context.config, "repository_poll_s", 5.0), metrics=context.state.get("metrics"),
                seen=context.state.get("repository_seen")),
        )


__all__ = ["ServiceContext", "Services"]
