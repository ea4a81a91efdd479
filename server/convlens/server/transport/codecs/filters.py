"""GetFilters messages."""

from __future__ import annotations

from convlens.server.engine import render
from convlens.server.service.filters import FiltersAnswer, FiltersQuery
from convlens.server.transport.codecs.common import enum, given, png, tensor
from convlens.server.transport.codecs.vocabulary import enum_names
from convlens.v1 import convlens_pb2 as pb

SCALINGS = enum_names(pb.FilterScaling, render.SCALINGS, unspecified="minmax",
                      spelled={"minmax": "PER_FILTER_MINMAX"})


def query(request: pb.GetFiltersRequest) -> FiltersQuery:
    return FiltersQuery(
        layer=request.layer,
        render_grid=request.render_grid,
        scaling=enum(SCALINGS, request.scaling, "scaling", "FilterScaling"),
        max_filters=given(request, "max_filters", FiltersQuery.max_filters),
        max_input_channels=given(request, "max_input_channels", FiltersQuery.max_input_channels),
        cell_scale=given(request, "cell_scale"),
    )


def response(answer: FiltersAnswer) -> pb.GetFiltersResponse:
    f = answer.filters
    return pb.GetFiltersResponse(
        weights=tensor(f.weights), bias=tensor(f.bias) if f.bias is not None else None,
        grid_png=png(answer.grid), dead_channels=f.dead_channels, layer_type=f.layer_type, groups=f.groups,
        stride=list(f.stride), padding=list(f.padding), dilation=list(f.dilation))
