"""An in-process fake ConvLens server (canned answers, no torch) and a fake Prometheus endpoint.

The servicer records what arrived (requests, decoded images, metadata) so tests can check the SDK's
encoding end to end, and answers with fixed messages so they can check its decoding.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from PIL import Image

from convlens.v1 import convlens_pb2 as pb
from convlens.v1 import convlens_pb2_grpc as pb_grpc
from convlens.wire.tensors import to_numpy, to_tensor

MODEL = "efficientnet_lite0"
WEIGHTS = np.random.default_rng(0).normal(size=(4, 3, 3, 3)).astype(np.float32)
BIAS = np.arange(4, dtype=np.float32)


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _abort(context: grpc.ServicerContext, code: int, message: str,
           violations: list[tuple[str, str]] = ()) -> None:  # type: ignore[assignment]
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.BadRequest(field_violations=[
        error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in violations]))
    status = status_pb2.Status(code=code, message=message, details=[detail])
    context.abort_with_status(rpc_status.to_status(status))


def decode_image(image: pb.Image) -> np.ndarray:
    if image.WhichOneof("source") == "encoded":
        return np.asarray(Image.open(io.BytesIO(image.encoded)))
    return to_numpy(image.tensor)


@dataclass
class Recorder:
    requests: list[Any] = field(default_factory=list)
    metadata: list[dict[str, str]] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)
    saliency_calls: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class FakeServicer(pb_grpc.InspectionServiceServicer):
    def __init__(self) -> None:
        self.rec = Recorder()

    def _record(self, request: Any, context: grpc.ServicerContext) -> None:
        with self.rec.lock:
            self.rec.requests.append(request)
            self.rec.metadata.append({k: v for k, v in context.invocation_metadata()})

    def _check_model(self, model: str, context: grpc.ServicerContext) -> None:
        if model != MODEL:
            _abort(context, code_pb2.NOT_FOUND, f"no model {model!r}", [("model", "not served")])

    def ListModels(self, request: Any, context: grpc.ServicerContext) -> pb.ListModelsResponse:  # noqa: N802
        self._record(request, context)
        return pb.ListModelsResponse(models=[
            pb.ModelInfo(name=MODEL, format="embedded", input_height=224, input_width=224, num_classes=1000,
                         resize=256, mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5], supports_gradients=True,
                         parameter_count=4652008, description="EfficientNet-Lite0"),
            pb.ModelInfo(name="tiny_onnx", format="onnx", input_height=32, input_width=32, num_classes=10),
        ])

    def GetModel(self, request: Any, context: grpc.ServicerContext) -> pb.GetModelResponse:  # noqa: N802
        self._record(request, context)
        self._check_model(request.model, context)
        return pb.GetModelResponse(
            model=pb.ModelInfo(name=MODEL, input_height=224, input_width=224, num_classes=3),
            layers=[
                pb.LayerInfo(name="_conv_stem", type="Conv2d", output_shape=[32, 112, 112],
                             parameter_count=864,
                             receptive_field=pb.ReceptiveField(size_y=3, size_x=3, jump_y=2, jump_x=2,
                                                               offset_y=0.5, offset_x=0.5), has_filters=True),
                pb.LayerInfo(name="_fc", type="Linear", output_shape=[1000], parameter_count=1281000),
            ],
            labels=["tench", "goldfish", "great white shark"])

    def GetFilters(self, request: Any, context: grpc.ServicerContext) -> pb.GetFiltersResponse:  # noqa: N802
        self._record(request, context)
        self._check_model(request.model, context)
        resp = pb.GetFiltersResponse(weights=to_tensor(WEIGHTS), bias=to_tensor(BIAS), dead_channels=[1, 3],
                                     layer_type="Conv2d", groups=1, stride=[2, 2], padding=[1, 1],
                                     dilation=[1, 1])
        if request.render_grid:
            resp.grid_png = png(Image.new("RGB", (40, 20), (10, 20, 30)))
        return resp

    def TopActivations(self, request: Any, context: grpc.ServicerContext) -> pb.TopActivationsResponse:  # noqa: N802
        self._record(request, context)
        if request.dataset == "none":
            _abort(context, code_pb2.UNIMPLEMENTED, "TopActivations is not implemented yet")
        return pb.TopActivationsResponse(
            images_scanned=17, channels=40, dataset=request.dataset,
            stats=pb.ChannelStats(images=17, mean=0.5, max=9.5, positive_fraction=0.25),
            activations=[pb.TopActivation(image_index=-1, source="skimage/chelsea.png", score=9.5, y=4, x=5,
                                          box=pb.Box(x0=1, y0=2, x1=30, y1=40),
                                          original_box=pb.Box(x0=2, y0=4, x1=60, y1=80), digest="ab12",
                                          crop_png=png(Image.new("RGB", (8, 8))))])

    def ListDatasets(self, request: Any, context: grpc.ServicerContext) -> pb.ListDatasetsResponse:  # noqa: N802
        self._record(request, context)
        return pb.ListDatasetsResponse(datasets=[pb.DatasetInfo(
            name="samples", description="photos", image_count=19, skipped_count=1, digest="ff",
            indexes=[pb.IndexInfo(model=MODEL, layer="_blocks.2", state=pb.INDEX_STATE_BUILDING, images_done=3,
                                  images_total=19)])])

    def Saliency(self, request: Any, context: grpc.ServicerContext) -> pb.SaliencyResponse:  # noqa: N802
        self._record(request, context)
        if request.model == "slow":
            time.sleep(1.0)
        if request.model == "bad":
            _abort(context, code_pb2.INVALID_ARGUMENT, "bad request",
                   [("target.unit.layer", "no layer 'nope'"), ("method", "unsupported")])
        self._check_model(request.model, context)
        img = decode_image(request.image)
        with self.rec.lock:
            self.rec.images.append(img)
            self.rec.saliency_calls += 1
        time.sleep(0.002)  # something for the load tester's percentiles to measure
        h, w = img.shape[:2]
        attribution = np.arange(3 * h * w, dtype=np.float32).reshape(3, h, w)
        target = request.target if request.HasField("target") else pb.Target(class_index=281)
        return pb.SaliencyResponse(
            attribution=to_tensor(attribution), heatmap=to_tensor(attribution.max(axis=0)),
            overlay_png=(png(Image.new("RGB", (w, h)))
                         if request.render_overlay or pb.SALIENCY_OUTPUT_OVERLAY in request.outputs else b""),
            predictions=[pb.Prediction(class_index=281, label="tabby", logit=12.5, probability=0.75),
                         pb.Prediction(class_index=282, label="tiger cat", logit=11.0, probability=0.2)],
            geometry=pb.Geometry(original_height=h, original_width=w, resized_height=256, resized_width=256,
                                 crop_top=16, crop_left=16, input_height=224, input_width=224, scale=0.5),
            target=target, target_value=12.5, modified_activations=42, notes=["fake server"])

    def _progress_then(self, request: Any, context: grpc.ServicerContext, response: Any,
                       make_result: Any) -> Iterator[Any]:
        self._record(request, context)
        self._check_model(request.model, context)
        for step in (1, 2, 3):
            preview = png(Image.new("RGB", (4, 4))) if step == 2 else b""
            yield response(progress=pb.Progress(step=step, total_steps=3,
                                                objectives={"objective": float(step)}, preview_png=preview))
        yield response(result=make_result())

    def MaximizeUnit(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:  # noqa: N802
        return self._progress_then(request, context, pb.MaximizeUnitResponse, lambda: pb.MaximizeUnitResult(
            image_png=png(Image.new("RGB", (16, 16))), objective=7.0,
            predictions=[pb.Prediction(class_index=1, label="goldfish", logit=3.0, probability=0.9)]))

    def Dream(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:  # noqa: N802
        return self._progress_then(request, context, pb.DreamResponse, lambda: pb.DreamResult(
            image_png=png(Image.new("RGB", (12, 10))), objective=5.0))

    def StyleTransfer(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:  # noqa: N802
        return self._progress_then(request, context, pb.StyleTransferResponse, lambda: pb.StyleTransferResult(
            image_png=png(Image.new("RGB", (8, 8))), style_loss=1.5, content_loss=0.25))


@dataclass
class FakeServer:
    target: str
    servicer: FakeServicer
    metrics_url: str

    @property
    def rec(self) -> Recorder:
        return self.servicer.rec


def metrics_text(servicer: FakeServicer) -> str:
    n = servicer.rec.saliency_calls
    lab = f'model="{MODEL}",rpc="Saliency"'
    # Per task: 2 ms queue wait; batches of 2 tasks taking 4 ms; a GetFilters series the parser must skip.
    return "\n".join([
        "# HELP convlens_scheduler_queue_wait_seconds Time a task waited.",
        "# TYPE convlens_scheduler_queue_wait_seconds histogram",
        f'convlens_scheduler_queue_wait_seconds_bucket{{{lab},le="+Inf"}} {n}',
        f"convlens_scheduler_queue_wait_seconds_sum{{{lab}}} {0.002 * n}",
        f"convlens_scheduler_queue_wait_seconds_count{{{lab}}} {n}",
        f'convlens_scheduler_queue_wait_seconds_sum{{model="{MODEL}",rpc="GetFilters"}} 99.0',
        f'convlens_scheduler_queue_wait_seconds_count{{model="{MODEL}",rpc="GetFilters"}} 1',
        f'convlens_scheduler_compute_seconds_sum{{device="cpu",{lab}}} {0.004 * (n / 2)}',
        f'convlens_scheduler_compute_seconds_count{{device="cpu",{lab}}} {n / 2}',
        f'convlens_scheduler_batch_size_sum{{device="cpu",{lab}}} {float(n)}',
        f'convlens_scheduler_batch_size_count{{device="cpu",{lab}}} {n / 2}',
        "",
    ])
