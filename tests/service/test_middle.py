"""The middle, in process: protobuf request -> server codec -> service (real Scheduler and worker, a tiny
model) -> server codec -> the SDK's conversion. Checked against plain torch on the same module, so a
codec, the service or the scheduler getting anything wrong shows here without a server process."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import numpy as np
import pytest
import torch
from PIL import Image

from convlens.client import _convert
from convlens.server.errors import InvalidArgument, NotFound
from convlens.server.metrics import Metrics
from convlens.server.models.catalog import build_catalog
from convlens.server.models.model import Preprocess, ServedModel
from convlens.server.models.preprocess import prepare
from convlens.server.models.repository import ModelRepository
from convlens.server.scheduler import BatchPolicy, Scheduler
from convlens.server.service.catalog import CatalogService
from convlens.server.service.context import ServiceContext
from convlens.server.service.filters import FiltersService
from convlens.server.service.saliency import SaliencyService
from convlens.server.transport.codecs import catalog as catalog_codec
from convlens.server.transport.codecs import filters as filters_codec
from convlens.server.transport.codecs import saliency as saliency_codec
from convlens.v1 import convlens_pb2 as pb
from tests.engine.conftest import LiteNet, randomise_batchnorm, seeded

MODEL = "tiny"
DEAD = [2, 5]  # stem channels whose BatchNorm has running_var == 0


def tiny_model() -> ServedModel:
    module = randomise_batchnorm(seeded(LiteNet(), 1), seed=1)
    module._bn0.running_var[DEAD] = 0.0
    pre = Preprocess(24, 24, 24, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    return ServedModel(name=MODEL, format="embedded", module=module.eval(), preprocess=pre,
                       labels=[f"class {i}" for i in range(5)], supports_gradients=True,
                       layers=build_catalog(module, pre))


def png_bytes(seed: int, h: int = 30, w: int = 40) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def model() -> ServedModel:
    return tiny_model()


@asynccontextmanager
async def started(model: ServedModel, policy: BatchPolicy) -> AsyncIterator[ServiceContext]:
    repository = ModelRepository([model])
    scheduler = Scheduler(repository.get, [torch.device("cpu")], Metrics(), policies={"cpu": policy}, max_queue=64)
    await scheduler.start()
    try:
        yield ServiceContext(repository=repository, scheduler=scheduler)
    finally:
        await scheduler.stop(2.0)


@pytest.fixture
async def context(model: ServedModel) -> AsyncIterator[ServiceContext]:
    async with started(model, BatchPolicy(4, 0.001)) as ctx:
        yield ctx


def saliency_request(image: bytes | None, **target: object) -> pb.SaliencyRequest:
    request = pb.SaliencyRequest(model=MODEL, method=pb.SALIENCY_METHOD_GRADIENT)
    if image is not None:
        request.image.encoded = image
    if target:
        request.target.CopyFrom(pb.Target(**target))  # type: ignore[arg-type]
    return request


def plain_gradient(model: ServedModel, image: bytes, class_index: int) -> tuple[torch.Tensor, float]:
    """d logit / d input with nothing but torch, on the contiguous module the repository holds."""
    pixels = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))
    x = prepare(pixels, model.preprocess)[0][None].clone().requires_grad_(True)
    logit = model.module(x)[0, class_index]
    logit.backward()
    assert x.grad is not None
    return x.grad[0], float(logit.detach())


async def test_saliency_round_trip_equals_plain_autograd(context: ServiceContext, model: ServedModel) -> None:
    service = SaliencyService(context)
    image = png_bytes(0)
    answer = await service(saliency_codec.query(saliency_request(image, class_index=3)), None)
    result = _convert.saliency(saliency_codec.response(answer))  # what the SDK hands its caller
    expected, logit = plain_gradient(model, image, 3)
    assert result.attribution.shape == (3, 24, 24) and result.attribution.dtype == np.float32
    np.testing.assert_allclose(result.attribution, expected.numpy(), rtol=1e-4,
                               atol=1e-5 * float(expected.abs().max()))
    np.testing.assert_allclose(result.heatmap, expected.abs().amax(0).numpy(), rtol=1e-4,
                               atol=1e-5 * float(expected.abs().max()))
    assert result.target_value == pytest.approx(logit, rel=1e-4, abs=1e-5)
    assert result.geometry is not None and (result.geometry.original_height, result.geometry.original_width) == (30, 40)
    with torch.no_grad():
        pixels = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))
        logits = model.module(prepare(pixels, model.preprocess)[0][None])[0]
    assert result.predictions[0].label == model.labels[int(logits.argmax())]


async def test_concurrent_saliency_calls_share_a_batch_and_equal_single_ones(model: ServedModel) -> None:
    images = [png_bytes(seed) for seed in range(4)]
    # A batch leaves when it is full (4) or after a minute: four calls make exactly one batch, however
    # slowly this machine decodes their images.
    async with started(model, BatchPolicy(4, 60.0)) as context:
        service = SaliencyService(context)
        answers = await asyncio.gather(*(service(saliency_codec.query(saliency_request(img, class_index=1)), None)
                                         for img in images))
        registry = context.scheduler._metrics.registry  # noqa: SLF001  (the scheduler's own metrics)
    labels = {"device": "cpu", "model": MODEL, "rpc": "Saliency"}
    assert registry.get_sample_value("convlens_scheduler_batch_size_count", labels) == 1
    assert registry.get_sample_value("convlens_scheduler_batch_size_sum", labels) == 4
    for image, answer in zip(images, answers, strict=True):
        expected, _ = plain_gradient(model, image, 1)
        torch.testing.assert_close(answer.result.attribution, expected, rtol=1e-4,
                                   atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize(("request_", "error", "field"), [
    (saliency_request(None), InvalidArgument, "image"),
    (saliency_request(b"not an image"), InvalidArgument, "image"),
    (saliency_request(png_bytes(1), unit=pb.Unit(layer="nope", channel=0)), NotFound, "target.unit.layer"),
    (saliency_request(png_bytes(1), unit=pb.Unit(layer="_conv_stem", channel=8)), InvalidArgument,
     "target.unit.channel"),
    (saliency_request(png_bytes(1), unit=pb.Unit(layer="_fc", channel=0, y=0, x=0)), InvalidArgument,
     "target.unit.y"),
    (saliency_request(png_bytes(1), class_index=5), InvalidArgument, "target.class_index"),
    (saliency_request(png_bytes(1), unit=pb.Unit(layer="_conv_stem", channel=0, y=1)), InvalidArgument,
     "target.unit.x"),
    (saliency_request(png_bytes(1), unit=pb.Unit(layer="_conv_stem", channel=0, x=1)), InvalidArgument,
     "target.unit.y"),
    (pb.SaliencyRequest(model=MODEL, method=pb.SALIENCY_METHOD_GRAD_CAM, grad_cam=pb.GradCamOptions(layer="_fc"),
                        image=pb.Image(encoded=png_bytes(1))), InvalidArgument, "grad_cam.layer"),
    (pb.SaliencyRequest(model=MODEL, method=pb.SALIENCY_METHOD_GRAD_CAM, grad_cam=pb.GradCamOptions(layer="x"),
                        image=pb.Image(encoded=png_bytes(1))), NotFound, "grad_cam.layer"),
    (pb.SaliencyRequest(model=MODEL, method=99, image=pb.Image(encoded=png_bytes(1))), InvalidArgument,
     "method"),
])
async def test_saliency_errors_name_their_field(context: ServiceContext, request_: pb.SaliencyRequest,
                                                error: type[Exception], field: str) -> None:
    with pytest.raises(error) as info:
        await SaliencyService(context)(saliency_codec.query(request_), None)
    assert info.value.violations[0].field == field  # type: ignore[attr-defined]


async def test_filters_round_trip(context: ServiceContext, model: ServedModel) -> None:
    request = pb.GetFiltersRequest(model=MODEL, layer="_conv_stem", render_grid=True,
                                   scaling=pb.FILTER_SCALING_SYMMETRIC)
    answer = await FiltersService(context)(MODEL, filters_codec.query(request), None)
    result = _convert.filters(filters_codec.response(answer))
    np.testing.assert_array_equal(result.weights, model.module._conv_stem.weight.detach().numpy())
    assert result.bias is None and result.dead_channels == DEAD
    assert (result.stride, result.padding, result.groups) == ((2, 2), (1, 1), 1)
    assert result.grid is not None and result.grid.width > 8 and result.grid.height > 8


@pytest.mark.parametrize(("layer", "error"), [("_bn0", InvalidArgument), ("nope", NotFound)])
async def test_filters_errors_name_the_layer(context: ServiceContext, layer: str, error: type[Exception]) -> None:
    with pytest.raises(error) as info:
        await FiltersService(context)(MODEL, filters_codec.query(pb.GetFiltersRequest(model=MODEL, layer=layer)),
                                      None)
    assert info.value.violations[0].field == "layer"  # type: ignore[attr-defined]


async def test_catalog_round_trip(context: ServiceContext, model: ServedModel) -> None:
    details = _convert.model_details(catalog_codec.get_model_response(CatalogService(context).get_model(MODEL)))
    assert details.info.name == MODEL and details.labels == model.labels
    assert [layer.name for layer in details.layers] == [name for name, _ in model.module.named_modules() if name]
    for layer, spec in zip(details.layers, model.layers, strict=True):
        assert layer.output_shape == spec.output_shape and layer.has_filters == spec.has_filters
        rf = spec.receptive_field
        if rf is None:
            assert layer.receptive_field is None
        else:
            assert layer.receptive_field is not None
            assert layer.receptive_field.box(1, 2) == rf.box(1, 2)
    listed = _convert.model_info(catalog_codec.list_models_response(CatalogService(context).list_models()).models[0])
    assert (listed.name, listed.num_classes) == (MODEL, 5)
