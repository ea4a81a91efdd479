"""What every RPC's service shares: the model repository and the scheduler; the gradient check."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from convlens.server.models.model import ServedModel, forward_only
from convlens.server.models.repository import ModelRepository
from convlens.server.scheduler.scheduler import Scheduler


@dataclass
class ServiceContext:
    repository: ModelRepository
    scheduler: Scheduler
    # Server settings a service may need (limits, directories); the ServerConfig in a running server.
    config: Any = None
    # Long-lived per-server state a service owns (e.g. dataset indexes), keyed by its owner's name.
    state: dict[str, Any] = field(default_factory=dict)


def require_gradients(model: ServedModel, technique: str) -> None:
    """FAILED_PRECONDITION for a model served forward-only (ONNX) when `technique` needs gradients."""
    if not model.supports_gradients:
        raise forward_only(model.format, technique, model.name)
