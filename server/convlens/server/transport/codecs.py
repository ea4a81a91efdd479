"""Protobuf messages <-> domain objects. Pure conversion: no decisions, no compute."""

from __future__ import annotations

import numpy as np

from convlens.client.tensors import to_numpy, to_tensor
from convlens.server.engine.predictions import Prediction
from convlens.server.engine.saliency import SaliencyOptions
from convlens.server.engine.targets import ClassTarget, Target, UnitTarget
from convlens.server.errors import InvalidArgument
from convlens.server.models.model import LayerSpec, ReceptiveField, ServedModel
from convlens.server.models.preprocess import Geometry
from convlens.server.ops.filters import FiltersQuery
from convlens.v1 import convlens_pb2 as pb

METHODS = {
    pb.SALIENCY_METHOD_UNSPECIFIED: "gradient",
    pb.SALIENCY_METHOD_GRADIENT: "gradient",
    pb.SALIENCY_METHOD_GUIDED_BACKPROP: "guided_backprop",
    pb.SALIENCY_METHOD_DECONVNET: "deconvnet",
    pb.SALIENCY_METHOD_SMOOTHGRAD: "smoothgrad",
    pb.SALIENCY_METHOD_INTEGRATED_GRADIENTS: "integrated_gradients",
    pb.SALIENCY_METHOD_GRAD_CAM: "grad_cam",
    pb.SALIENCY_METHOD_GUIDED_GRAD_CAM: "guided_grad_cam",
}
SMOOTH_BASES = ("gradient", "guided_backprop", "deconvnet", "integrated_gradients")
BASELINES = {pb.BASELINE_UNSPECIFIED: "black", pb.BASELINE_BLACK: "black", pb.BASELINE_BLURRED: "blurred",
             pb.BASELINE_IMAGE: "image"}
REDUCTIONS = {pb.REDUCTION_UNSPECIFIED: "mean", pb.REDUCTION_MEAN: "mean", pb.REDUCTION_MAX: "max"}
SCALINGS = {pb.FILTER_SCALING_UNSPECIFIED: "minmax", pb.FILTER_SCALING_PER_FILTER_MINMAX: "minmax",
            pb.FILTER_SCALING_SYMMETRIC: "symmetric"}


def _enum(table: dict[int, str], value: int, field: str, enum_name: str) -> str:
    if value not in table:
        raise InvalidArgument(f"unknown {enum_name} value {value}", field=field)
    return table[value]


# ---------------------------------------------------------------- requests


def image_input(message: pb.Image, field: str) -> bytes | np.ndarray | None:
    kind = message.WhichOneof("source")
    if kind == "encoded":
        return bytes(message.encoded)
    if kind == "tensor":
        try:
            array = to_numpy(message.tensor)
        except ValueError as exc:
            raise InvalidArgument(str(exc), field=f"{field}.tensor") from None
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
            raise InvalidArgument(
                f"an image tensor is [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]; got shape {list(array.shape)}",
                field=f"{field}.tensor.shape")
        if array.dtype not in (np.uint8, np.float32):
            raise InvalidArgument(f"an image tensor is uint8 or float32 (0..255); got {array.dtype}",
                                  field=f"{field}.tensor.dtype")
        if min(array.shape[:2]) < 1:
            raise InvalidArgument("an image tensor has no pixels", field=f"{field}.tensor.shape")
        if array.dtype == np.float32 and not np.isfinite(array).all():
            raise InvalidArgument("an image tensor holds NaN or infinite values", field=f"{field}.tensor.data")
        return array
    return None


def target(message: pb.Target, has_field: bool, field: str = "target") -> Target | None:
    if not has_field:
        return None
    kind = message.WhichOneof("kind")
    if kind == "class_index":
        return ClassTarget(int(message.class_index))
    if kind == "unit":
        u = message.unit
        if u.HasField("y") != u.HasField("x"):
            raise InvalidArgument("give both y and x, or neither (a whole channel)", field=f"{field}.unit.y")
        return UnitTarget(
            layer=u.layer, channel=int(u.channel),
            y=int(u.y) if u.HasField("y") else None, x=int(u.x) if u.HasField("x") else None,
            reduction=_enum(REDUCTIONS, u.reduction, f"{field}.unit.reduction", "Reduction"))
    return None


def saliency_options(request: pb.SaliencyRequest) -> SaliencyOptions:
    method = _enum(METHODS, request.method, "method", "SaliencyMethod")
    sg, ig = request.smoothgrad, request.integrated_gradients
    base = _enum(METHODS, sg.base_method, "smoothgrad.base_method", "SaliencyMethod")
    if method == "smoothgrad" and base not in SMOOTH_BASES:
        raise InvalidArgument(f"smoothgrad.base_method must be one of {', '.join(SMOOTH_BASES)}",
                              field="smoothgrad.base_method")
    return SaliencyOptions(
        method=method,
        smooth_base=base,
        smooth_samples=sg.samples or 16,
        smooth_noise=sg.noise_level if sg.noise_level else 0.15,
        seed=int(sg.seed),
        ig_steps=ig.steps or 50,
        ig_baseline=_enum(BASELINES, ig.baseline, "integrated_gradients.baseline", "Baseline"),
        ig_blur_sigma=ig.blur_sigma or 10.0,
        cam_layer=request.grad_cam.layer or None,
    )


def filters_query(request: pb.GetFiltersRequest) -> FiltersQuery:
    return FiltersQuery(
        layer=request.layer,
        render_grid=request.render_grid,
        scaling=_enum(SCALINGS, request.scaling, "scaling", "FilterScaling"),
        max_filters=request.max_filters or 64,
        max_input_channels=request.max_input_channels or 16,
        cell_scale=request.cell_scale or None,
    )


# ---------------------------------------------------------------- responses


def model_info(model: ServedModel) -> pb.ModelInfo:
    pre = model.preprocess
    return pb.ModelInfo(
        name=model.name, format=model.format, input_height=pre.height, input_width=pre.width,
        num_classes=model.num_classes, resize=pre.resize, mean=list(pre.mean), std=list(pre.std),
        supports_gradients=model.supports_gradients, parameter_count=model.parameter_count,
        description=model.description)


def receptive_field(rf: ReceptiveField | None) -> pb.ReceptiveField | None:
    if rf is None:
        return None
    return pb.ReceptiveField(size_y=rf.size_y, size_x=rf.size_x, jump_y=rf.jump_y, jump_x=rf.jump_x,
                             offset_y=rf.offset_y, offset_x=rf.offset_x)


def layer_info(spec: LayerSpec) -> pb.LayerInfo:
    return pb.LayerInfo(name=spec.name, type=spec.type, output_shape=list(spec.output_shape),
                        parameter_count=spec.parameter_count, receptive_field=receptive_field(spec.receptive_field),
                        has_filters=spec.has_filters)


def prediction(p: Prediction) -> pb.Prediction:
    return pb.Prediction(class_index=p.class_index, label=p.label, logit=p.logit, probability=p.probability)


def geometry(g: Geometry) -> pb.Geometry:
    return pb.Geometry(
        original_height=g.original_height, original_width=g.original_width,
        resized_height=g.resized_height, resized_width=g.resized_width, crop_top=g.crop_top,
        crop_left=g.crop_left, input_height=g.input_height, input_width=g.input_width, scale=g.scale)


def target_message(t: Target) -> pb.Target:
    if isinstance(t, ClassTarget):
        return pb.Target(class_index=t.index)
    unit = pb.Unit(layer=t.layer, channel=t.channel,
                   reduction=pb.REDUCTION_MAX if t.reduction == "max" else pb.REDUCTION_MEAN)
    if t.y is not None and t.x is not None:
        unit.y, unit.x = t.y, t.x
    return pb.Target(unit=unit)


def tensor(array: np.ndarray) -> pb.Tensor:
    return to_tensor(np.ascontiguousarray(array, dtype=np.float32))
