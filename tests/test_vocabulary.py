"""One vocabulary: every enumerated option is defined once in the engine; the server's codecs derive their
tables from it (and refuse to import when the proto disagrees); the SDK, which may import neither torch
nor the server, keeps its own tables, pinned here to the same names and proto values."""

from __future__ import annotations

import argparse
import typing

import pytest

from convlens.client import _cli, _convert, _types
from convlens.server.engine import integrated_gradients, render, saliency, smoothgrad, targets
from convlens.server.engine.optimize import maximize as maximize_engine
from convlens.server.engine.optimize import style as style_engine
from convlens.server.indexing import manager as index_manager
from convlens.server.service import model_control
from convlens.server.service import saliency as saliency_service
from convlens.server.service import top_activations as top_service
from convlens.server.transport.codecs import common, filters
from convlens.server.transport.codecs import maximize as maximize_codec
from convlens.server.transport.codecs import repository as repository_codec
from convlens.server.transport.codecs import saliency as saliency_codec
from convlens.server.transport.codecs import style as style_codec
from convlens.server.transport.codecs import top_activations as top_codec
from convlens.server.transport.codecs.vocabulary import enum_names, enum_values
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


def test_ranking_and_state_tables_are_derived() -> None:
    """TopActivations' rankings and the two state enums (an index's, a model version's) come from the
    service's tuples too: every proto value has its name, every name its value, and the SDK agrees."""
    assert top_codec.RANKINGS[pb.RANKING_UNSPECIFIED] == "max"  # unset: ranked by the spatial max
    assert named(top_codec.RANKINGS) == {"max": pb.RANKING_MAX, "mean": pb.RANKING_MEAN} == _convert.RANKINGS
    assert set(top_codec.RANKINGS.values()) == set(top_service.RANKINGS)
    assert top_service.STATES == index_manager.INDEX_STATES
    assert top_codec.STATES == {"ready": pb.INDEX_STATE_READY, "building": pb.INDEX_STATE_BUILDING,
                                "absent": pb.INDEX_STATE_ABSENT}
    assert set(top_codec.STATES) == set(index_manager.INDEX_STATES)
    assert set(top_codec.STATES.values()) == set(pb.IndexState.values()) - {pb.INDEX_STATE_UNSPECIFIED}
    assert {v: k for k, v in top_codec.STATES.items()} == _convert._INDEX_STATES
    assert repository_codec.STATES == {model_control.READY: pb.MODEL_STATE_READY,
                                       model_control.UNAVAILABLE: pb.MODEL_STATE_UNAVAILABLE,
                                       model_control.LOADING: pb.MODEL_STATE_LOADING}
    assert set(repository_codec.STATES.values()) == set(pb.ModelState.values()) - {pb.MODEL_STATE_UNSPECIFIED}


def test_a_drifted_state_fails_loudly() -> None:
    with pytest.raises(RuntimeError, match="no IndexState value"):
        enum_names(pb.IndexState, (*index_manager.INDEX_STATES, "stale"), unspecified=None)
    with pytest.raises(RuntimeError, match="MODEL_STATE_LOADING has no option"):
        enum_names(pb.ModelState, (model_control.READY, model_control.UNAVAILABLE), unspecified=None)


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


def test_optimisation_tables_are_derived_from_the_engine_and_pinned_to_the_sdk() -> None:
    derived = {
        "preset": (maximize_codec.PRESETS, maximize_engine.PRESETS, _convert._PRESETS),
        "parameterization": (maximize_codec.PARAMETERIZATIONS, maximize_engine.PARAMETERIZATIONS,
                             _convert._PARAMETERIZATIONS),
        "optimizer": (style_codec.OPTIMIZERS, style_engine.OPTIMIZERS, _convert._OPTIMIZERS),
        "gram_normalization": (style_codec.GRAMS, style_engine.GRAM_NORMALIZATIONS, _convert._GRAMS),
        "init": (style_codec.INITS, style_engine.INITS, _convert._INITS),
    }
    for name, (table, engine_names, sdk) in derived.items():
        assert set(table.values()) == set(engine_names), name
        assert set(table) == {v for v in table if v == 0} | set(sdk.values()), name  # every proto value
        assert named(table) == sdk, name
    assert maximize_codec.PRESETS[pb.MAXIMIZE_PRESET_UNSPECIFIED] == "lucid"
    assert style_codec.OPTIMIZERS[pb.OPTIMIZER_UNSPECIFIED] == "adam"
    assert pb.PARAMETERIZATION_UNSPECIFIED not in maximize_codec.PARAMETERIZATIONS  # unset: the preset's


def test_maximize_knobs_are_declared_once_on_the_settings() -> None:
    """KNOBS (read off MaximizeSettings' fields) are exactly the request's optional numbers, and each
    range is what the service enforces: its ends pass, just outside fails, naming the field."""
    from dataclasses import fields

    from convlens.server.errors import InvalidArgument

    optional = {f.name for f in pb.MaximizeUnitRequest.DESCRIPTOR.fields if f.has_presence and f.message_type is None}
    assert set(maximize_engine.KNOBS) == optional - {"diversity_layer"}  # the one optional string (a layer name)
    assert set(maximize_engine.KNOBS) <= {f.name for f in fields(maximize_engine.MaximizeSettings)}
    for name, (low, high) in maximize_engine.KNOBS.items():
        if name in ("size", "pad", "jitter", "final_jitter", "scale_jitter"):
            continue  # bounded together by the input side as well; their ranges are checked below
        for ok in (low, high):
            assert getattr(maximize_engine.MaximizeSettings.checked("lucid", **{name: ok}), name) == ok
        with pytest.raises(InvalidArgument) as e:
            maximize_engine.MaximizeSettings.checked("lucid", **{name: high + 1})
        assert [v.field for v in e.value.violations] == [name]
    for name in ("size", "pad", "jitter", "final_jitter", "scale_jitter"):
        low, high = maximize_engine.KNOBS[name]
        with pytest.raises(InvalidArgument) as e:
            maximize_engine.MaximizeSettings.checked("lucid", **{name: low - 1})
        assert [v.field for v in e.value.violations] == [name]


def test_the_one_reverse_lookup() -> None:
    """Every derived table, read back: each option to the one non-UNSPECIFIED value that names it."""
    tables = [saliency_codec.METHODS, saliency_codec.BASELINES, common.REDUCTIONS, filters.SCALINGS,
              maximize_codec.PRESETS, maximize_codec.PARAMETERIZATIONS, style_codec.OPTIMIZERS, style_codec.SOFTEN,
              style_codec.GRAMS, style_codec.INITS, style_codec.DISTANCES, top_codec.RANKINGS]
    for table in tables:
        values = enum_values(table)
        assert set(values) == set(table.values()) and 0 not in values.values()
        assert all(table[value] == name for name, value in values.items())
    assert enum_values(maximize_codec.PRESETS) == {"lecture": pb.MAXIMIZE_PRESET_LECTURE,
                                                   "lucid": pb.MAXIMIZE_PRESET_LUCID, "maco": pb.MAXIMIZE_PRESET_MACO}


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
