"""Saliency: which input pixels a unit or class logit depends on, batched across callers."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import torch
from PIL import Image

from convlens.server.compute.saliency import SaliencyPayload, compute_saliency
from convlens.server.engine.budget import Budget, check_saliency, saliency_work
from convlens.server.engine.grad_cam import check_cam_layer
from convlens.server.engine.predictions import Prediction, top_k
from convlens.server.engine.render import overlay
from convlens.server.engine.saliency import SaliencyOptions, SaliencyResult, validate_options
from convlens.server.engine.targets import Target, validate_target
from convlens.server.errors import Violations
from convlens.server.models.model import ServedModel
from convlens.server.models.preprocess import Geometry, denormalize
from convlens.server.scheduler.task import Task
from convlens.server.service.context import ServiceContext, require_gradients
from convlens.server.service.images import ImageInput, PreparedImage, prepare_image

# What a Saliency answer can carry (SaliencyRequest.outputs); the default is every one but the overlay.
OUTPUTS = ("attribution", "heatmap", "overlay", "predictions")
DEFAULT_OUTPUTS = frozenset({"attribution", "heatmap", "predictions"})


@dataclass
class SaliencyQuery:
    model: str
    image: ImageInput | None
    target: Target | None
    options: SaliencyOptions
    baseline_image: ImageInput | None = None
    render_overlay: bool = False
    outputs: frozenset[str] | None = None  # None: DEFAULT_OUTPUTS; render_overlay adds "overlay"

    def wanted(self) -> frozenset[str]:
        base = DEFAULT_OUTPUTS if self.outputs is None else self.outputs
        return base | {"overlay"} if self.render_overlay else base


@dataclass
class SaliencyAnswer:
    result: SaliencyResult
    predictions: list[Prediction]
    geometry: Geometry
    overlay: Image.Image | None
    notes: list[str] = field(default_factory=list)
    outputs: frozenset[str] = DEFAULT_OUTPUTS  # what the answer carries: the codec encodes only these


class SaliencyService:
    def __init__(self, context: ServiceContext) -> None:
        self.repository = context.repository
        self.scheduler = context.scheduler
        self.budget = Budget.from_config(context.config)

    async def __call__(self, query: SaliencyQuery, deadline: float | None) -> SaliencyAnswer:
        model = self.repository.get(query.model)
        require_gradients(model, "Saliency")
        self.validate(model, query)
        self.check_budget(model.preprocess.height, model.preprocess.width, query.options)
        image, baseline = await asyncio.to_thread(self.decode, model, query)
        payload = SaliencyPayload(query.options, image.tensor, query.target, baseline, self.budget.chunk_pixels)
        task = Task(model=model.name, rpc="Saliency", key=payload.batch_key, payload=payload,
                    compute=compute_saliency, deadline=deadline, served=model)
        result: SaliencyResult = await self.scheduler.submit(task)
        wanted = query.wanted()
        picture = None
        if "overlay" in wanted:
            # Pixel attributions are smoothed for the picture (only); a Grad-CAM map already is smooth.
            smooth = 0.0 if query.options.method == "grad_cam" else 2.5
            picture = await asyncio.to_thread(
                lambda: overlay(denormalize(image.tensor, model.preprocess), result.heatmap.numpy(), smooth=smooth))
        predictions = top_k(result.logits, model.labels, 5) if "predictions" in wanted else []
        return SaliencyAnswer(result, predictions, image.geometry, picture, list(result.notes), outputs=wanted)

    @staticmethod
    def validate(model: ServedModel, query: SaliencyQuery) -> None:
        """Every bad field at once (one INVALID_ARGUMENT, a violation each). An unknown layer (the target's
        or Grad-CAM's) is a NOT_FOUND answered on its own: the proto header's rule."""
        v = Violations()
        if query.image is None:
            v.add("image", "image is required: encoded PNG/JPEG/WebP bytes or a raw tensor")
        v.collect(validate_options, query.options)
        v.collect(validate_target, model.resolver, query.target, num_classes=model.num_classes)
        if query.options.cam_layer is not None:
            v.collect(check_cam_layer, model.resolver, query.options.cam_layer)
        if query.options.ig_baseline == "image" and query.baseline_image is None:
            v.add("baseline_image", "baseline BASELINE_IMAGE needs baseline_image")
        v.raise_if_any()

    @staticmethod
    def decode(model: ServedModel, query: SaliencyQuery) -> tuple[PreparedImage, torch.Tensor | None]:
        """The image (and the integrated-gradients baseline image) as model inputs; both checked before
        either is refused. Runs off the event loop."""
        v = Violations()
        assert query.image is not None  # validate() refused a missing one
        image = v.collect(prepare_image, model, query.image, "image")
        baseline = None
        if query.options.ig_baseline == "image" and query.baseline_image is not None:
            baseline = v.collect(prepare_image, model, query.baseline_image, "baseline_image")
        v.raise_if_any()
        assert isinstance(image, PreparedImage)
        return image, baseline.tensor if isinstance(baseline, PreparedImage) else None

    def check_budget(self, height: int, width: int, options: SaliencyOptions) -> None:
        """RESOURCE_EXHAUSTED (OVER_BUDGET) before anything is decoded or queued when the request's rows x the
        model's input pixels exceed the server's budget (engine/budget.py)."""
        o = options
        work = saliency_work(o.method, samples=o.smooth_samples, steps=o.ig_steps, base=o.smooth_base,
                             height=height, width=width)
        check_saliency(work, self.budget, height=height, width=width)
