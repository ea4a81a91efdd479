"""One rule for defaults (the .proto header): unset optional fields take the default, an explicit 0 is used
as sent where it is valid and refused (INVALID_ARGUMENT naming the field) where not; every violation found
before compute comes back in one answer, with an ErrorInfo reason; reflection v1 beside v1alpha."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha import reflection_pb2

import convlens.client as cl
from convlens.client import AsyncClient
from convlens.server.app import ConvLensServer
from tests.streaming.conftest import MODEL, photo

DREAM = dict(octaves=1, steps_per_octave=1, max_size=48)


async def test_dream_seed_unset_is_drawn_and_reported_zero_is_honoured(client: AsyncClient) -> None:
    drawn = [(await client.dream(photo(), MODEL, "stage1", **DREAM)).settings["seed"] for _ in range(2)]
    assert drawn[0] != drawn[1]  # two random 31-bit seeds (equal with probability 2^-31)
    zero = await client.dream(photo(), MODEL, "stage1", seed=0, jitter=0, **DREAM)
    assert zero.settings["seed"] == 0 and zero.settings["jitter"] == 0
    again = await client.dream(photo(), MODEL, "stage1", seed=zero.settings["seed"], jitter=0, **DREAM)
    assert np.array_equal(np.asarray(again.image), np.asarray(zero.image))  # the reported seed reproduces it


async def test_explicit_zero_where_invalid_is_refused_with_every_field(client: AsyncClient) -> None:
    with pytest.raises(cl.InvalidArgumentError) as caught:
        await client.dream(photo(), MODEL, "stage1", steps_per_octave=0, step_size=0.0, octaves=1, max_size=48)
    assert [v.field for v in caught.value.field_violations] == ["steps_per_octave", "step_size"]
    assert caught.value.reason == "INVALID_ARGUMENT"
    with pytest.raises(cl.InvalidArgumentError) as caught:
        await client.style_transfer(photo(), photo(seed=2), MODEL, steps=0, size=0)
    assert [v.field for v in caught.value.field_violations] == ["steps", "size"]
    with pytest.raises(cl.InvalidArgumentError) as caught:
        await client.maximize_unit(MODEL, cl.Unit("stage1", 0), steps=0, size=8)
    assert {v.field for v in caught.value.field_violations} == {"steps", "size"}


async def test_style_seed_reported(client: AsyncClient) -> None:
    result = await client.style_transfer(photo(), photo(seed=2), MODEL, steps=1, size=32, seed=0)
    assert result.settings["seed"] == 0 and result.settings["steps"] == 1


async def test_smoothgrad_noise_level_zero_is_honoured(client: AsyncClient) -> None:
    """noise_level 0 used to mean "default 0.15"; now it means no noise: SmoothGrad over noiseless copies
    is the plain gradient (an independent check of the value actually used)."""
    image = photo(32, 32)
    plain = await client.saliency(image, MODEL, target=1, method="gradient", overlay=False)
    smooth = await client.saliency(image, MODEL, target=1, method="smoothgrad", samples=2, noise_level=0.0,
                                   overlay=False)
    noisy = await client.saliency(image, MODEL, target=1, method="smoothgrad", samples=2, overlay=False)
    np.testing.assert_allclose(smooth.attribution, plain.attribution, rtol=1e-4, atol=1e-6)
    assert not np.allclose(noisy.attribution, plain.attribution, rtol=1e-4, atol=1e-6)


async def test_unknown_model_reason(client: AsyncClient) -> None:
    with pytest.raises(cl.NotFoundError) as caught:
        await client.get_model("no-such-model")
    assert caught.value.reason == "MODEL_NOT_FOUND"
    with pytest.raises(cl.NotFoundError) as caught:
        await client.dream(photo(), MODEL, "no.such.layer", **DREAM)
    assert caught.value.reason == "LAYER_NOT_FOUND"


@pytest.mark.parametrize("service", ["grpc.reflection.v1.ServerReflection",
                                     "grpc.reflection.v1alpha.ServerReflection"])
async def test_reflection_v1_and_v1alpha(server: ConvLensServer, service: str) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = channel.stream_stream(f"/{service}/ServerReflectionInfo",
                                     request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                     response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        answers = [a async for a in call(iter([
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="convlens.v1.InspectionService")]))]
    names = {s.name for s in answers[0].list_services_response.service}
    assert {"convlens.v1.InspectionService", "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection"} <= names
    from google.protobuf import descriptor_pb2

    files = [descriptor_pb2.FileDescriptorProto.FromString(b)
             for b in answers[1].file_descriptor_response.file_descriptor_proto]
    assert any(f.name == "convlens/v1/convlens.proto" for f in files)
