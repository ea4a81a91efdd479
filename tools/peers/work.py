"""What the peers compute, written as a user of torch would, answering with ConvLens's own messages.

Both peers (the plain gRPC server and the Ray Serve deployment) run exactly this: decode the PNG, resize +
centre-crop + normalise (the model's preprocessing), forward + backward to the input in channels_last, the
top-1 logit's gradient; the answer is a SaliencyResponse with the heatmap (max over channels of |gradient|),
the top-5 predictions, the target and its value: what the bench asks ConvLens for (outputs heatmap +
predictions). MaximizeUnit runs one job per request with the engine's own step (no batching across
callers) and answers a MaximizeUnitResponse with the final image and objective.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from convlens.server.engine.optimize.maximize import MaximizeJob, MaximizeSettings, evaluate
from convlens.server.engine.optimize.objectives import ClassLogit
from convlens.server.engine.optimize.runner import run_step
from convlens.server.engine.predictions import top_k
from convlens.server.models.embedded import load_lite
from convlens.server.models.loaders import load_folder
from convlens.server.models.model import ServedModel
from convlens.server.models.preprocess import prepare
from convlens.v1 import convlens_pb2 as pb
from convlens.wire.tensors import to_tensor
from tools.common import MODEL


def load(model: str) -> ServedModel:
    """`efficientnet_lite0` (the embedded weights) or a model folder (model.toml), in channels_last."""
    served = load_lite(model) if model == MODEL else load_folder(Path(model))
    return served.replica(torch.device("cpu"), memory_format=torch.channels_last, fresh=True)


def decode(request: pb.SaliencyRequest, model: ServedModel) -> torch.Tensor:
    """The request's PNG/JPEG as the model's normalised [3, H, W] input."""
    with Image.open(io.BytesIO(request.image.encoded)) as img:
        rgb = np.asarray(img.convert("RGB"))
    return prepare(rgb, model.preprocess)[0]


def saliency(model: ServedModel, inputs: Sequence[torch.Tensor]) -> list[pb.SaliencyResponse]:
    """Gradient saliency of each image's top-1 logit, one forward + backward for the batch."""
    x = torch.stack(list(inputs)).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    logits = model.module(x)
    top = logits.detach().argmax(dim=1)
    (grad,) = torch.autograd.grad(logits.gather(1, top[:, None]).sum(), x)
    heat = grad.detach().abs().amax(dim=1).contiguous().numpy()
    logits = logits.detach()
    return [pb.SaliencyResponse(
        heatmap=to_tensor(np.ascontiguousarray(heat[i], dtype=np.float32)),
        predictions=[pb.Prediction(class_index=p.class_index, label=p.label, logit=p.logit,
                                   probability=p.probability) for p in top_k(logits[i], model.labels, 5)],
        target=pb.Target(class_index=int(top[i])), target_value=float(logits[i, top[i]]))
        for i in range(len(inputs))]


def maximize(model: ServedModel, request: pb.MaximizeUnitRequest) -> pb.MaximizeUnitResponse:
    """One MaximizeUnit job for a class logit, step after step, alone on this thread."""
    if request.target.WhichOneof("kind") != "class_index":
        raise ValueError("the peers maximise class logits only")
    overrides = {k: getattr(request, k) for k in ("steps", "size", "seed") if request.HasField(k)}
    preset = pb.MaximizePreset.Name(request.preset).removeprefix("MAXIMIZE_PRESET_").lower()
    settings = MaximizeSettings.resolve(None if preset == "unspecified" else preset, **overrides)
    pre = model.preprocess
    job = MaximizeJob(settings, ClassLogit(request.target.class_index), mean=pre.mean, std=pre.std,
                      device=torch.device("cpu"))
    while not job.done:
        run_step(model.module, [job])
    (final,) = evaluate(model.module, [job])
    buf = io.BytesIO()
    Image.fromarray(job.image_uint8()).save(buf, format="PNG")
    return pb.MaximizeUnitResponse(result=pb.MaximizeUnitResult(
        image_png=buf.getvalue(), objective=final.objective, target=request.target))
