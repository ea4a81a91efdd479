"""What every streaming optimisation RPC shares (MaximizeUnit, Dream, StyleTransfer, and any future one).

A service subclasses `StreamingJobService` and, in its `__call__`:

    model = self.gradient_model(query.model)       # NOT_FOUND, or FAILED_PRECONDITION for forward-only
    check_preview_every(query.preview_every)        # with the rest of its validation, before admission
    ...decode the caller's images off the loop (caller_pixels)...
    async with self.job(model, deadline) as handle:              # admission: RESOURCE_EXHAUSTED
        job = await off_loop(lambda: build_job(handle.device))   # resizes, noise: off the loop too
        async for event in self.progress(handle, job, query.preview_every, render):
            yield event                                          # Progress, previews built off the loop
        final = await handle.submit(key, payload, compute)       # a one-shot task on the job's device
    yield Answer(await off_loop(render), ...)

so admission, the progress/preview loop and the rules for the options they share are written once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import numpy as np
import torch
from PIL import Image

from convlens.server.engine.budget import Budget, check_job
from convlens.server.engine.optimize.job import Job
from convlens.server.errors import Violations
from convlens.server.models.model import ServedModel
from convlens.server.models.preprocess import as_rgb
from convlens.server.scheduler.steps import JobHandle
from convlens.server.service.context import ServiceContext, require_gradients
from convlens.server.service.images import ImageInput, to_array

T = TypeVar("T")


@dataclass
class Progress:
    step: int  # steps done, 1-based
    total_steps: int
    terms: dict[str, float]  # named loss / objective values at this step
    preview: Image.Image | None = None  # when the caller asked for previews and this step is one
    octave: int | None = None  # Dream: the octave the step ran in (0-based, smallest first)


def check_preview_every(every: int, violations: Violations | None = None) -> None:
    """The one rule for `preview_every`: 0 means no previews, n > 0 one every n steps, < 0 is refused
    (added to `violations` when given, so it is reported with the request's other bad fields)."""
    v = Violations() if violations is None else violations
    v.check(every >= 0, "preview_every", f"preview_every = {every} is negative; 0 for no previews, n > 0 for one "
            "every n steps")
    if violations is None:
        v.raise_if_any()


def given_or(value: T | None, default: T) -> T:
    """A request's optional setting: the caller's value when given (0 included), else the default."""
    return default if value is None else value


def wants_preview(every: int, step: int, total: int, *, last: bool = False) -> bool:
    """A preview at every `every`-th step; at the last step only when `last` (its image is the result's)."""
    if every <= 0:
        return False
    if step >= total:
        return last
    return step % every == 0


async def off_loop(render: Callable[[], T]) -> T:
    """Build a picture, a job or anything else CPU-bound on a thread, so the event loop keeps serving: the one
    rule for every streaming service (decoding the caller's images, building the job, previews, the result)."""
    return await asyncio.to_thread(render)


class StreamingJobService:
    """The base of an optimisation RPC's service: its model check, admission and progress loop."""

    rpc: ClassVar[str]
    # MaximizeUnit has always sent a preview with its last progress event too; Dream and StyleTransfer
    # never did (the result carries that image). Kept per RPC so callers see no change.
    preview_last: ClassVar[bool] = False

    def __init__(self, context: ServiceContext) -> None:
        self.repository = context.repository
        self.scheduler = context.scheduler
        self.budget = Budget.from_config(context.config)

    def check_budget(self, pixels: int, what: str, fields: tuple[str, ...]) -> int:
        """RESOURCE_EXHAUSTED (OVER_BUDGET) before admission when one step of the job would work on more
        pixels than the server's --max-job-mpx (engine/budget.py); else `pixels`, the job's cost."""
        check_job(pixels, self.budget, rpc=self.rpc, what=what, fields=fields)
        return pixels

    def gradient_model(self, name: str) -> ServedModel:
        """The served model `name`, which must run backward (the optimisation needs gradients)."""
        model = self.repository.get(name)
        require_gradients(model, self.rpc)
        return model

    @asynccontextmanager
    async def job(self, model: ServedModel, deadline: float | None, cost: int = 0) -> AsyncIterator[JobHandle]:
        """Admission (RESOURCE_EXHAUSTED beyond --max-jobs); leaving the block frees the slot. `cost`: the pixels
        one step works on (check_budget's), which bounds how many steps share a batch (Task.cost)."""
        async with self.scheduler.job(model=model.name, rpc=self.rpc, deadline=deadline, served=model) as handle:
            handle.cost = cost
            yield handle

    async def progress(self, handle: JobHandle, job: Job, preview_every: int,
                       render: Callable[[], Image.Image]) -> AsyncIterator[Progress]:
        """Step `job` to the end, one Progress per step; previews are rendered off the event loop. The next
        step is asked for when the caller takes this one's event: a reader that stops reading pauses its job
        (scheduler/steps.py)."""
        async with aclosing(handle.steps(job)) as reports:
            async for report in reports:
                preview = None
                if wants_preview(preview_every, report.step, report.total_steps, last=self.preview_last):
                    preview = await off_loop(render)
                yield Progress(report.step, report.total_steps, dict(report.terms), preview, report.octave)


def picture(pixels: torch.Tensor) -> Image.Image:
    """A [3, H, W] 0..255 tensor as an RGB picture."""
    array = pixels.detach().to("cpu", torch.float32).clamp(0, 255).round().to(torch.uint8)
    return Image.fromarray(np.ascontiguousarray(array.permute(1, 2, 0).numpy()), mode="RGB")


def caller_pixels(image: ImageInput, field: str) -> torch.Tensor:
    """The caller's image as a float32 [3, H, W] tensor on the 0..255 scale (decoded, size-bounded, RGB).
    Runs off the event loop. Errors name `field`."""
    rgb = as_rgb(to_array(image, field), field=field)
    array = np.clip(rgb.astype(np.float32, copy=False), 0.0, 255.0)
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).contiguous()
