"""The layer resolver: one lookup, the three layer errors with their fields, and per-model facts kept with
the resolver (so with the replica), computed once."""

from __future__ import annotations

import pytest
import torch

from convlens.server.engine import filters, grad_cam
from convlens.server.engine.layers import LayerResolver
from convlens.server.errors import InvalidArgument, NotFound

SHAPES = {"features": (8, 8, 8), "features.0": (6, 16, 16), "features.1": (6, 16, 16), "features.2": (8, 8, 8),
          "features.3": (8, 8, 8), "features.4": (8, 8, 8), "features.5": (8, 8, 8), "pool": (8, 1, 1),
          "head": (5,)}


def test_names_resolve_to_the_modules(relu_net) -> None:
    r = LayerResolver(relu_net, shapes=SHAPES)
    assert r.module("features.2") is relu_net.features[2]
    assert r.name_of(relu_net.head) == "head"
    assert list(r) == [name for name, _ in relu_net.named_modules() if name]
    assert r.output_shape("head") == (5,) and r.map_shape("features.0") == (6, 16, 16)
    assert r.conv("features.2") is relu_net.features[2]


@pytest.mark.parametrize(("call", "error", "hint"), [
    (lambda r: r.module("nope", field="target.unit.layer"), NotFound, "GetModel"),
    (lambda r: r.map_shape("head", field="target.unit.layer"), InvalidArgument, "not a (C, H, W) map"),
    (lambda r: r.conv("features.1", field="target.unit.layer"), InvalidArgument, "no convolution weights"),
])
def test_each_layer_error_names_the_field_it_was_asked_for(relu_net, call, error, hint) -> None:
    with pytest.raises(error) as info:
        call(LayerResolver(relu_net, shapes=SHAPES, model_name="tiny"))
    assert info.value.violations[0].field == "target.unit.layer"
    assert hint in info.value.message


def test_without_a_catalog_shapes_are_unknown_not_wrong(relu_net) -> None:
    r = LayerResolver(relu_net)
    assert r.output_shape("head") is None and r.map_shape("head") is None
    with pytest.raises(NotFound):
        r.output_shape("nope")


def test_the_default_cam_layer_is_probed_once_per_resolver(relu_net) -> None:
    calls = []
    handle = relu_net.register_forward_pre_hook(lambda m, args: calls.append(1))
    try:
        first, second = LayerResolver(relu_net), LayerResolver(relu_net)
        for _ in range(3):
            assert grad_cam.default_cam_layer(relu_net, input_size=(16, 16), resolver=first) == "features"
        assert len(calls) == 1, "the probe ran again for a fact the resolver holds"
        grad_cam.default_cam_layer(relu_net, input_size=(24, 24), resolver=first)  # another input size
        grad_cam.default_cam_layer(relu_net, input_size=(16, 16), resolver=second)  # another replica
        assert len(calls) == 3
    finally:
        handle.remove()


def test_dead_channels_are_found_once_per_resolver(lite_net) -> None:
    lite_net._bn0.running_var[[1, 6]] = 0.0
    r = LayerResolver(lite_net)
    calls = []
    handle = lite_net.register_forward_pre_hook(lambda m, args: calls.append(1))
    try:
        example = torch.zeros(3, 16, 16)
        assert filters.conv_filters(r, "_conv_stem", example).dead_channels == [1, 6]
        assert filters.conv_filters(r, "_conv_stem", example).dead_channels == [1, 6]
        assert len(calls) == 1
    finally:
        handle.remove()


def test_the_engine_keeps_no_per_model_caches_in_module_globals() -> None:
    import weakref

    for module in (filters, grad_cam):
        caches = [name for name, value in vars(module).items()
                  if isinstance(value, (weakref.WeakKeyDictionary, weakref.WeakValueDictionary))]
        assert not caches, f"{module.__name__} caches per-model facts in globals: {caches}"
