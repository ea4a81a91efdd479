"""One vocabulary: every enumerated option is defined once in the engine; the server's codecs derive their
tables from it (and refuse to import when the proto disagrees); the SDK, which may import neither torch
nor the server, keeps its own tables, pinned here to the same names and proto values."""

from __future__ import annotations

import argparse
import typing

import pytest

from convlens.client import _cli, _convert, _types
from convlens.server.engine import integrated_gradients, render, saliency, smoothgrad, targets
from convlens.server.engine import style as style_engine
from convlens.server.service import saliency as saliency_service
from convlens.server.service import top_activations as top_service
from convlens.server.transport.codecs import common, filters
from convlens.server.transport.codecs import saliency as saliency_codec
from convlens.server.transport.codecs import style as style_codec
from convlens.server.transport.codecs import top_activations as top_codec
from convlens.server.transport.codecs.vocabulary import enum_names
from convlens.v1 import convlens_pb2 as pb


def named(table: dict[int, str]) -> dict[str, int]:
    """{option: proto value} without the UNSPECIFIED alias."""
    return {name: value for value, name in table.items() if value != 0}


def test_server_tables_cover_every_proto_value_and_every_option() -> None:
    assert set(saliency_codec.METHODS.values()) == set(saliency.METHODS)
    assert set(saliency_codec.METHODS) == set(pb.SaliencyMethod.values())
    assert saliency_codec.METHODS[pb.SALIENCY_METHOD_GUIDED_BACKPROP] == "guided_backprop"
    assert set(saliency_codec.BASELINES.values()) == set(integrated_gradients.BASELINES)
    assert set(common.REDUCTIONS.values()) == set(targets.REDUCTIONS)
    assert set(filters.SCALINGS.values()) == set(render.SCALINGS)
    assert filters.SCALINGS[pb.FILTER_SCALING_PER_FILTER_MINMAX] == "minmax"
    assert set(saliency_codec.SMOOTH_BASES) <= set(saliency.METHODS)
    assert set(saliency_codec.SALIENCY_OUTPUTS.values()) == set(saliency_service.OUTPUTS)
    assert set(top_codec.TOP_OUTPUTS.values()) == set(top_service.OUTPUTS)


def test_a_drifted_option_fails_loudly() -> None:
    with pytest.raises(RuntimeError, match="no Reduction value"):
        enum_names(pb.Reduction, (*targets.REDUCTIONS, "median"), unspecified="mean")
    with pytest.raises(RuntimeError, match="REDUCTION_MAX has no option"):
        enum_names(pb.Reduction, ("mean",), unspecified="mean")


def test_sdk_saliency_methods_are_the_engines() -> None:
    assert _convert.SALIENCY_METHODS == named(saliency_codec.METHODS)


def test_sdk_scalings_reductions_and_baselines_are_the_engines() -> None:
    assert _convert._SCALINGS == named(filters.SCALINGS)
    assert _convert._REDUCTIONS == named(common.REDUCTIONS)
    # The SDK takes an image for the "image" baseline; the named ones must match the engine's.
    assert {**_convert._BASELINES, "image": pb.BASELINE_IMAGE} == named(saliency_codec.BASELINES)
    assert set(typing.get_args(_types.Reduction)) == set(targets.REDUCTIONS)


def test_sdk_output_tables_are_the_servers() -> None:
    assert _convert.SALIENCY_OUTPUTS == named(saliency_codec.SALIENCY_OUTPUTS)
    assert _convert.TOP_OUTPUTS == named(top_codec.TOP_OUTPUTS)


def test_sdk_style_tables_are_the_servers() -> None:
    assert _convert._DISTANCES == named(style_codec.DISTANCES)
    assert set(_convert._DISTANCES) == set(style_engine.STYLE_DISTANCES) == set(typing.get_args(_types.StyleDistance))
    assert _convert._SOFTEN == named(style_codec.SOFTEN) and set(_convert._SOFTEN) == set(style_engine.SOFTEN)


def test_cli_choices_are_the_engines() -> None:
    choices: dict[str, set[str]] = {}
    parser = _cli._parser()
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for sub in subparsers:
        for command in sub.choices.values():
            for action in command._actions:
                if action.choices is not None and action.dest in ("scaling", "reduction", "method", "base_method",
                                                                  "style_distance", "soften"):
                    choices.setdefault(action.dest, set()).update(action.choices)
    assert choices["scaling"] == set(render.SCALINGS)
    assert choices["reduction"] == set(targets.REDUCTIONS)
    assert choices["method"] == choices["base_method"] == set(saliency.METHODS)
    assert set(smoothgrad.BASES) <= choices["base_method"]
    assert choices["style_distance"] == set(style_engine.STYLE_DISTANCES)
    assert choices["soften"] == set(style_engine.SOFTEN)
