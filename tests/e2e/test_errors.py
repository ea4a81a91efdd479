"""Every bad request gets its status code, a message a caller can act on, and a field violation."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from convlens.client import Client, Unit
from convlens.client import _exceptions as exc
from convlens.v1 import convlens_pb2 as pb
from convlens.v1 import convlens_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow
IMAGE = np.full((64, 64, 3), 128, dtype=np.uint8)


def fields(err: exc.ConvLensError) -> list[str]:
    return [f for f, _ in err.field_violations]


def test_unknown_model_is_not_found_and_lists_the_served_models(client: Client) -> None:
    with pytest.raises(exc.NotFoundError) as e:
        client.get_model("resnet1000")
    assert "efficientnet_lite0" in e.value.message and fields(e.value) == ["model"]


def test_unknown_layer_is_not_found_and_says_how_to_list_layers(client: Client) -> None:
    with pytest.raises(exc.NotFoundError) as e:
        client.get_filters("efficientnet_lite0", "_blocks.99")
    assert "_blocks.99" in e.value.message and "layers" in e.value.message and fields(e.value) == ["layer"]


def test_layer_without_conv_weights_is_invalid_and_named(client: Client) -> None:
    with pytest.raises(exc.InvalidArgumentError) as e:
        client.get_filters("efficientnet_lite0", "_bn0")
    assert "_bn0" in e.value.message and fields(e.value) == ["layer"]


def test_out_of_range_grid_option_is_invalid(client: Client) -> None:
    with pytest.raises(exc.InvalidArgumentError) as e:
        client.get_filters("efficientnet_lite0", "_conv_stem", grid=True, max_filters=100000)
    assert fields(e.value) == ["max_filters"]


def test_garbage_image_bytes_are_invalid(client: Client) -> None:
    with pytest.raises(exc.InvalidArgumentError) as e:
        client.saliency(b"this is not a png", "efficientnet_lite0")
    assert fields(e.value) == ["image"]


def test_class_index_out_of_range_is_invalid(client: Client) -> None:
    with pytest.raises(exc.InvalidArgumentError) as e:
        client.saliency(IMAGE, "efficientnet_lite0", target=1000)
    assert "999" in e.value.message or "1000" in e.value.message
    assert fields(e.value)[0].startswith("target")


def test_unit_channel_out_of_range_is_invalid(client: Client) -> None:
    with pytest.raises(exc.InvalidArgumentError) as e:
        client.saliency(IMAGE, "efficientnet_lite0", target=Unit("_blocks.10", 5000))
    assert fields(e.value)[0].startswith("target.unit")


def test_unknown_unit_layer_is_not_found(client: Client) -> None:
    with pytest.raises(exc.NotFoundError) as e:
        client.saliency(IMAGE, "efficientnet_lite0", target=Unit("nope", 0))
    assert fields(e.value)[0].startswith("target.unit")


def test_gradients_on_onnx_are_a_failed_precondition(client: Client) -> None:
    with pytest.raises(exc.FailedPreconditionError) as e:
        client.saliency(IMAGE, "tinyonnx")
    assert "onnx" in e.value.message.lower()


def test_raw_stub_bad_tensor_shape_and_missing_image(server) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.InspectionServiceStub(channel)
        bad = pb.Tensor(dtype=pb.DTYPE_UINT8, shape=[4, 4, 7], data=bytes(4 * 4 * 7))
        with pytest.raises(grpc.RpcError) as e:
            stub.Saliency(pb.SaliencyRequest(model="efficientnet_lite0", image=pb.Image(tensor=bad)), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "shape" in e.value.details()
        short = pb.Tensor(dtype=pb.DTYPE_UINT8, shape=[4, 4, 3], data=bytes(10))
        with pytest.raises(grpc.RpcError) as e:
            stub.Saliency(pb.SaliencyRequest(model="efficientnet_lite0", image=pb.Image(tensor=short)), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "bytes" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            stub.Saliency(pb.SaliencyRequest(model="efficientnet_lite0"), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "image" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            stub.Saliency(pb.SaliencyRequest(model="efficientnet_lite0", image=pb.Image(encoded=b"x"),
                                             method=99), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "method" in e.value.details().lower()


def test_server_stays_healthy_after_errors(client: Client) -> None:
    assert client.get_model("efficientnet_lite0").info.name == "efficientnet_lite0"
