"""The application service: what each RPC does, in domain terms (no grpc, no protobuf).

The transport converts messages to these calls and back; compute goes through the scheduler.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from convlens.server.engine.predictions import Prediction, top_k
from convlens.server.engine.render import overlay
from convlens.server.engine.saliency import SaliencyOptions, SaliencyResult, validate_options
from convlens.server.engine.targets import Target, validate_target
from convlens.server.errors import FailedPrecondition, InvalidArgument
from convlens.server.models.model import ServedModel
from convlens.server.models.preprocess import Geometry, decode_image, denormalize, prepare
from convlens.server.models.repository import ModelRepository
from convlens.server.ops.filters import FiltersAnswer, FiltersQuery, compute_filters
from convlens.server.ops.saliency import SaliencyPayload, compute_saliency
from convlens.server.scheduler.scheduler import Scheduler
from convlens.server.scheduler.task import Task

ImageInput = bytes | np.ndarray  # encoded bytes, or a raw [H, W(, C)] array on the 0..255 scale
MAX_IMAGE_PIXELS = 40_000_000


@dataclass
class PreparedImage:
    tensor: torch.Tensor  # normalised [3, H, W]
    geometry: Geometry


@dataclass
class SaliencyQuery:
    model: str
    image: ImageInput | None
    target: Target | None
    options: SaliencyOptions
    baseline_image: ImageInput | None = None
    render_overlay: bool = False


@dataclass
class SaliencyAnswer:
    result: SaliencyResult
    predictions: list[Prediction]
    geometry: Geometry
    overlay: Image.Image | None
    notes: list[str] = field(default_factory=list)


class Inspector:
    def __init__(self, repository: ModelRepository, scheduler: Scheduler) -> None:
        self.repository = repository
        self.scheduler = scheduler

    # ---------------------------------------------------------------- catalog

    def list_models(self) -> list[ServedModel]:
        return self.repository.models()

    def get_model(self, name: str) -> ServedModel:
        return self.repository.get(name)

    # ---------------------------------------------------------------- filters

    async def get_filters(self, model_name: str, query: FiltersQuery, deadline: float | None) -> FiltersAnswer:
        model = self.repository.get(model_name)
        query.validate()
        spec = model.layer(query.layer)
        if not spec.has_filters:
            raise InvalidArgument(
                f"layer {query.layer!r} of {model_name!r} is a {spec.type}, which has no convolution weights; "
                "choose a layer with has_filters = true (`convlens layers MODEL`)",
                field="layer",
            )
        task = Task(model=model.name, rpc="GetFilters", key=query, payload=query,
                    compute=compute_filters, deadline=deadline)
        answer: FiltersAnswer = await self.scheduler.submit(task)
        return answer

    # ---------------------------------------------------------------- saliency

    async def saliency(self, query: SaliencyQuery, deadline: float | None) -> SaliencyAnswer:
        model = self.repository.get(query.model)
        if not model.supports_gradients:
            raise FailedPrecondition(
                f"model {model.name!r} is served in the {model.format} format, which runs forward-only here; "
                "gradient techniques need a torchvision, TorchScript or embedded model"
            )
        if query.image is None:
            raise InvalidArgument("image is required: encoded PNG/JPEG/WebP bytes or a raw tensor", field="image")
        validate_options(query.options)
        validate_target(model.module, query.target, num_classes=model.num_classes, layer_shapes=model.layer_shapes)
        if query.options.cam_layer is not None:
            model.layer(query.options.cam_layer, field_name="grad_cam.layer")
        image = await asyncio.to_thread(self.prepare_image, model, query.image, "image")
        baseline = None
        if query.options.ig_baseline == "image":
            if query.baseline_image is None:
                raise InvalidArgument("baseline BASELINE_IMAGE needs baseline_image", field="baseline_image")
            baseline = (await asyncio.to_thread(self.prepare_image, model, query.baseline_image,
                                                "baseline_image")).tensor
        payload = SaliencyPayload(query.options, image.tensor, query.target, baseline)
        task = Task(model=model.name, rpc="Saliency", key=payload.batch_key, payload=payload,
                    compute=compute_saliency, deadline=deadline)
        result: SaliencyResult = await self.scheduler.submit(task)
        picture = None
        if query.render_overlay:
            # Pixel attributions are smoothed for the picture (only); a Grad-CAM map already is smooth.
            smooth = 0.0 if query.options.method == "grad_cam" else 2.5
            picture = await asyncio.to_thread(
                lambda: overlay(denormalize(image.tensor, model.preprocess), result.heatmap.numpy(), smooth=smooth))
        return SaliencyAnswer(result, top_k(result.logits, model.labels, 5), image.geometry, picture,
                              list(result.notes))

    # ---------------------------------------------------------------- helpers

    @staticmethod
    def prepare_image(model: ServedModel, image: ImageInput, field_name: str) -> PreparedImage:
        """Decode (if needed), resize + crop + normalise. Runs off the event loop."""
        if isinstance(image, bytes | bytearray):
            if not image:
                raise InvalidArgument("image bytes are empty", field=field_name)
            array = decode_image(bytes(image), field=field_name)
        else:
            array = image
        if array.shape[0] * array.shape[1] > MAX_IMAGE_PIXELS:
            raise InvalidArgument(
                f"image is {array.shape[1]}x{array.shape[0]}; at most {MAX_IMAGE_PIXELS} pixels are accepted, "
                "resize it first", field=field_name)
        tensor, geometry = prepare(array, model.preprocess)
        return PreparedImage(tensor, geometry)


def deadline_from_timeout(remaining: float | None) -> float | None:
    """A gRPC time_remaining() (seconds, None when unbounded) as a time.monotonic() deadline."""
    # A few ms early: the server drops a queued task itself (counted as "deadline") just before grpc
    # cancels the call at the caller's deadline (which would count it as "cancelled").
    return None if remaining is None else time.monotonic() + remaining - 0.005
