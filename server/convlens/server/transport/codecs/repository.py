"""ModelRepositoryService messages (model control)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from convlens.server.service.model_control import LOADING, READY, UNAVAILABLE, VersionState
from convlens.v1 import convlens_pb2 as pb

STATES = {READY: pb.MODEL_STATE_READY, UNAVAILABLE: pb.MODEL_STATE_UNAVAILABLE, LOADING: pb.MODEL_STATE_LOADING}


def target(request: Any) -> tuple[str, int | None]:
    """(model, version or None) of a LoadModelRequest / UnloadModelRequest."""
    return request.model, request.version if request.HasField("version") else None


def entries(states: Sequence[VersionState]) -> list[pb.RepositoryModel]:
    return [pb.RepositoryModel(name=s.name, version=s.version, state=STATES[s.state], reason=s.reason,
                               source=s.source, default_version=s.default) for s in states]


def index_response(states: Sequence[VersionState], mode: str) -> pb.RepositoryIndexResponse:
    return pb.RepositoryIndexResponse(models=entries(states), model_control=mode)
