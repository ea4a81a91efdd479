"""ModelRepositoryService messages (model control)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from convlens.server.service import model_control
from convlens.server.service.model_control import VersionState
from convlens.server.transport.codecs.vocabulary import enum_names, enum_values
from convlens.v1 import convlens_pb2 as pb

STATES = enum_values(enum_names(pb.ModelState, model_control.STATES, unspecified=None))  # READY -> MODEL_STATE_READY


def target(request: Any) -> tuple[str, int | None]:
    """(model, version or None) of a LoadModelRequest / UnloadModelRequest."""
    return request.model, request.version if request.HasField("version") else None


def entries(states: Sequence[VersionState]) -> list[pb.RepositoryModel]:
    return [pb.RepositoryModel(name=s.name, version=s.version, state=STATES[s.state], reason=s.reason,
                               source=s.source, default_version=s.default) for s in states]


def index_response(states: Sequence[VersionState], mode: str) -> pb.RepositoryIndexResponse:
    return pb.RepositoryIndexResponse(models=entries(states), model_control=mode)
