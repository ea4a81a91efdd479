"""Python arguments -> request messages, response messages -> result dataclasses.

Shared by Client and AsyncClient so both build byte-identical requests. Everything here is pure (no
channel, no I/O beyond reading image files), and validates what it can before a call is made: a wrong
method name is a ValueError on the caller's line, not an INVALID_ARGUMENT a round trip later.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
from PIL import Image

from convlens.client._types import ChannelStats, DatasetInfo, IndexInfo
from convlens.v1 import convlens_pb2 as pb
from convlens.wire.tensors import to_numpy

from ._images import png_to_pil, to_image
from ._types import (
    DreamResult,
    Filters,
    Geometry,
    ImageInput,
    LayerInfo,
    MaximizeImage,
    MaximizeResult,
    ModelDetails,
    ModelInfo,
    Prediction,
    Progress,
    ReceptiveField,
    RepositoryModel,
    SaliencyResult,
    StyleTransferResult,
    Target,
    TopActivation,
    TopActivations,
    Unit,
)

SALIENCY_METHODS: dict[str, pb.SaliencyMethod.ValueType] = {
    "gradient": pb.SALIENCY_METHOD_GRADIENT,
    "guided_backprop": pb.SALIENCY_METHOD_GUIDED_BACKPROP,
    "deconvnet": pb.SALIENCY_METHOD_DECONVNET,
    "smoothgrad": pb.SALIENCY_METHOD_SMOOTHGRAD,
    "integrated_gradients": pb.SALIENCY_METHOD_INTEGRATED_GRADIENTS,
    "grad_cam": pb.SALIENCY_METHOD_GRAD_CAM,
    "guided_grad_cam": pb.SALIENCY_METHOD_GUIDED_GRAD_CAM,
}
RANKINGS = {"max": pb.RANKING_MAX, "mean": pb.RANKING_MEAN}
_INDEX_STATES = {pb.INDEX_STATE_READY: "ready", pb.INDEX_STATE_BUILDING: "building", pb.INDEX_STATE_ABSENT: "absent"}
_SCALINGS = {"minmax": pb.FILTER_SCALING_PER_FILTER_MINMAX, "symmetric": pb.FILTER_SCALING_SYMMETRIC}
_BASELINES = {"black": pb.BASELINE_BLACK, "blurred": pb.BASELINE_BLURRED}
SALIENCY_OUTPUTS = {"attribution": pb.SALIENCY_OUTPUT_ATTRIBUTION, "heatmap": pb.SALIENCY_OUTPUT_HEATMAP,
                    "overlay": pb.SALIENCY_OUTPUT_OVERLAY, "predictions": pb.SALIENCY_OUTPUT_PREDICTIONS}
TOP_OUTPUTS = {"entries": pb.TOP_ACTIVATIONS_OUTPUT_ENTRIES, "crops": pb.TOP_ACTIVATIONS_OUTPUT_CROPS,
               "images": pb.TOP_ACTIVATIONS_OUTPUT_IMAGES, "stats": pb.TOP_ACTIVATIONS_OUTPUT_STATS,
               "photos": pb.TOP_ACTIVATIONS_OUTPUT_PHOTOS}
_REDUCTIONS = {"mean": pb.REDUCTION_MEAN, "max": pb.REDUCTION_MAX}
_PARAMETERIZATIONS = {"fft": pb.PARAMETERIZATION_FFT, "pixel": pb.PARAMETERIZATION_PIXEL,
                      "maco": pb.PARAMETERIZATION_MACO}
_PRESETS = {"lucid": pb.MAXIMIZE_PRESET_LUCID, "lecture": pb.MAXIMIZE_PRESET_LECTURE,
            "maco": pb.MAXIMIZE_PRESET_MACO}
_OPTIMIZERS = {"lbfgs": pb.OPTIMIZER_LBFGS, "adam": pb.OPTIMIZER_ADAM}
_SOFTEN = {"none": pb.SOFTEN_NONE, "channels": pb.SOFTEN_CHANNELS, "positions": pb.SOFTEN_POSITIONS,
           "all": pb.SOFTEN_ALL}
_GRAMS = {"positions": pb.GRAM_NORMALIZATION_POSITIONS, "elements": pb.GRAM_NORMALIZATION_ELEMENTS,
          "none": pb.GRAM_NORMALIZATION_NONE}
_INITS = {"content": pb.STYLE_INIT_CONTENT, "noise": pb.STYLE_INIT_NOISE}
_DISTANCES = {"mse": pb.STYLE_DISTANCE_MSE, "relative": pb.STYLE_DISTANCE_RELATIVE}

_Code = TypeVar("_Code", bound=int)  # an enum's number, typed as that enum's values


def _choice(table: Mapping[str, _Code], value: str, what: str) -> _Code:
    try:
        return table[value]
    except (KeyError, TypeError):
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(table)}") from None


# ---------------------------------------------------------------- requests


def _given(opts: Mapping[str, Any]) -> dict[str, Any]:
    # None means "not given" (the server's default), as for the explicit keyword arguments.
    return {k: v for k, v in opts.items() if v is not None}


def target_msg(target: Target) -> pb.Target:
    if isinstance(target, Unit):
        unit = pb.Unit(layer=target.layer, channel=target.channel,
                       reduction=_choice(_REDUCTIONS, target.reduction, "reduction"))
        if target.y is not None and target.x is not None:
            unit.y, unit.x = target.y, target.x
        return pb.Target(unit=unit)
    if isinstance(target, bool) or not isinstance(target, int | np.integer):
        raise TypeError(f"target must be a class index (int) or a Unit, not {type(target).__name__}")
    return pb.Target(class_index=int(target))


def filters_request(model: str, layer: str, *, grid: bool, scaling: str, max_filters: int | None,
                    max_input_channels: int | None, cell_scale: int | None) -> pb.GetFiltersRequest:
    return pb.GetFiltersRequest(model=model, layer=layer, render_grid=grid,
                                scaling=_choice(_SCALINGS, scaling, "scaling"),
                                **_given({"max_filters": max_filters, "max_input_channels": max_input_channels,
                                          "cell_scale": cell_scale}))


def top_activations_request(model: str, layer: str, channel: int, *, k: int, dataset: str | None,
                            images: Sequence[ImageInput] | None, crops: bool, include_images: bool,
                            ranking: str = "max", max_per_image: int = 1,
                            outputs: Sequence[str] | None = None) -> pb.TopActivationsRequest:
    return pb.TopActivationsRequest(
        model=model, layer=layer, channel=channel, k=k, dataset=dataset or "",
        include_crops=crops, include_images=include_images, ranking=_choice(RANKINGS, ranking, "ranking"),
        max_per_image=max_per_image, outputs=[_choice(TOP_OUTPUTS, o, "output") for o in outputs or ()],
        images=[to_image(img, what=f"images[{i}]") for i, img in enumerate(images or ())])


def saliency_request(image: ImageInput, model: str, *, target: Target | None, method: str,
                     samples: int | None, noise_level: float | None, base_method: str | None,
                     seed: int | None, steps: int | None, baseline: str | ImageInput | None,
                     blur_sigma: float | None, cam_layer: str | None, overlay: bool,
                     outputs: Sequence[str] | None = None) -> pb.SaliencyRequest:
    """`outputs` None: the server's default (+ the overlay when `overlay`); else exactly those outputs."""
    req = pb.SaliencyRequest(model=model, method=_choice(SALIENCY_METHODS, method, "saliency method"),
                             render_overlay=overlay and outputs is None,
                             outputs=[_choice(SALIENCY_OUTPUTS, o, "output") for o in outputs or ()])
    if samples is not None or noise_level is not None or base_method is not None or seed is not None:
        req.smoothgrad.SetInParent()
        sg = req.smoothgrad
        if base_method is not None:
            sg.base_method = _choice(SALIENCY_METHODS, base_method, "base method")
        for name, value in _given({"samples": samples, "noise_level": noise_level, "seed": seed}).items():
            setattr(sg, name, value)  # presence: an explicit 0 (e.g. noise_level) is sent as such
    if steps is not None or baseline is not None or blur_sigma is not None:
        ig = req.integrated_gradients
        ig.SetInParent()
        for name, value in _given({"steps": steps, "blur_sigma": blur_sigma}).items():
            setattr(ig, name, value)
        if isinstance(baseline, str) and baseline in _BASELINES:
            ig.baseline = _BASELINES[baseline]
        elif baseline is not None:  # an image: the caller's own starting point
            ig.baseline = pb.BASELINE_IMAGE
            req.baseline_image.CopyFrom(to_image(baseline, what="baseline"))
    if cam_layer:
        req.grad_cam.layer = cam_layer
    if target is not None:
        req.target.CopyFrom(target_msg(target))
    # The image last: the cheap validations above fail before a large file is read and encoded.
    req.image.CopyFrom(to_image(image))
    return req


def maximize_request(model: str, target: Target, opts: Mapping[str, Any]) -> pb.MaximizeUnitRequest:
    kw = _given(opts)
    if "parameterization" in kw:
        kw["parameterization"] = _choice(_PARAMETERIZATIONS, kw["parameterization"], "parameterization")
    if "preset" in kw:
        kw["preset"] = _choice(_PRESETS, kw["preset"], "preset")
    return pb.MaximizeUnitRequest(model=model, target=target_msg(target), **kw)


def dream_request(image: ImageInput, model: str, layer: str | None, opts: Mapping[str, Any]) -> pb.DreamRequest:
    kw = _given(opts)
    if "guide" in kw:
        kw["guide"] = to_image(kw["guide"], what="guide")
    return pb.DreamRequest(model=model, layer=layer or "", image=to_image(image), **kw)


def style_request(content: ImageInput, style: ImageInput, model: str,
                  opts: Mapping[str, Any]) -> pb.StyleTransferRequest:
    kw = _given(opts)
    if "optimizer" in kw:
        kw["optimizer"] = _choice(_OPTIMIZERS, kw["optimizer"], "optimizer")
    if "style_layers" in kw:
        kw["style_layers"] = list(kw["style_layers"])
    if "style_layer_weights" in kw:
        kw["style_layer_weights"] = [float(w) for w in kw["style_layer_weights"]]
    if "soften" in kw:
        soften = kw.pop("soften")
        kw["soften_mode"] = _choice(_SOFTEN, "channels" if soften is True else "none" if soften is False else soften,
                                    "soften")
    if "gram_normalization" in kw:
        kw["gram_normalization"] = _choice(_GRAMS, kw["gram_normalization"], "gram_normalization")
    if "init" in kw:
        kw["init"] = _choice(_INITS, kw["init"], "init")
    if "style_distance" in kw:
        kw["style_distance"] = _choice(_DISTANCES, kw["style_distance"], "style_distance")
    return pb.StyleTransferRequest(model=model, content=to_image(content, what="content"),
                                   style=to_image(style, what="style"), **kw)


# ---------------------------------------------------------------- responses


def model_info(m: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(name=m.name, format=m.format, input_size=(m.input_height, m.input_width),
                     num_classes=m.num_classes, resize=m.resize, mean=tuple(m.mean), std=tuple(m.std),
                     supports_gradients=m.supports_gradients, parameter_count=m.parameter_count,
                     description=m.description, version=m.version or 1)


def repository_models(models: Any) -> list[RepositoryModel]:
    states = {pb.MODEL_STATE_READY: "READY", pb.MODEL_STATE_UNAVAILABLE: "UNAVAILABLE",
              pb.MODEL_STATE_LOADING: "LOADING"}
    return [RepositoryModel(name=m.name, version=m.version, state=states.get(m.state, "UNSPECIFIED"),
                            reason=m.reason, source=m.source, default=m.default_version) for m in models]


def model_target(name: str, version: int | None) -> dict[str, Any]:
    """The fields of a LoadModelRequest / UnloadModelRequest."""
    return {"model": name} if version is None else {"model": name, "version": version}


def _layer(layer: pb.LayerInfo) -> LayerInfo:
    rf = layer.receptive_field
    return LayerInfo(
        name=layer.name, type=layer.type, output_shape=tuple(int(s) for s in layer.output_shape),
        parameter_count=layer.parameter_count,
        receptive_field=(ReceptiveField((rf.size_y, rf.size_x), (rf.jump_y, rf.jump_x),
                                        (rf.offset_y, rf.offset_x))
                         if layer.HasField("receptive_field") else None),
        has_filters=layer.has_filters)


def model_details(r: pb.GetModelResponse) -> ModelDetails:
    return ModelDetails(info=model_info(r.model), layers=[_layer(x) for x in r.layers], labels=list(r.labels))


def _f32(t: pb.Tensor) -> npt.NDArray[np.float32]:
    arr: npt.NDArray[np.float32] = to_numpy(t).astype(np.float32, copy=False)
    return arr


def filters(r: pb.GetFiltersResponse) -> Filters:
    return Filters(weights=_f32(r.weights), bias=_f32(r.bias) if r.HasField("bias") else None,
                   dead_channels=list(r.dead_channels), grid=png_to_pil(r.grid_png), layer_type=r.layer_type,
                   groups=r.groups, stride=tuple(r.stride), padding=tuple(r.padding),
                   dilation=tuple(r.dilation))


def predictions(ps: Iterable[pb.Prediction]) -> list[Prediction]:
    return [Prediction(p.class_index, p.label, p.logit, p.probability) for p in ps]


def _target(t: pb.Target) -> Target | None:
    kind = t.WhichOneof("kind")
    if kind == "class_index":
        return int(t.class_index)
    if kind == "unit":
        u = t.unit
        both = u.HasField("y") and u.HasField("x")
        return Unit(u.layer, u.channel, u.y if both else None, u.x if both else None,
                    "max" if u.reduction == pb.REDUCTION_MAX else "mean")
    return None


def saliency(r: pb.SaliencyResponse) -> SaliencyResult:
    g = r.geometry
    geometry = (Geometry(g.original_height, g.original_width, g.resized_height, g.resized_width, g.crop_top,
                         g.crop_left, g.input_height, g.input_width, g.scale)
                if r.HasField("geometry") else None)
    return SaliencyResult(attribution=_f32(r.attribution) if r.HasField("attribution") else None,
                          heatmap=_f32(r.heatmap) if r.HasField("heatmap") else None,
                          overlay=png_to_pil(r.overlay_png), predictions=predictions(r.predictions),
                          geometry=geometry, target=_target(r.target), target_value=r.target_value,
                          modified_activations=r.modified_activations, notes=list(r.notes),
                          baseline_value=r.baseline_value if r.HasField("baseline_value") else None)


def _box(b: pb.Box) -> tuple[int, int, int, int]:
    return (b.x0, b.y0, b.x1, b.y1)


def _geometry(g: pb.Geometry) -> Geometry:
    return Geometry(g.original_height, g.original_width, g.resized_height, g.resized_width, g.crop_top,
                    g.crop_left, g.input_height, g.input_width, g.scale)


def top_activations(r: pb.TopActivationsResponse) -> TopActivations:
    s = r.stats
    return TopActivations(
        [TopActivation(a.image_index, a.source, a.score, a.y, a.x, _box(a.box), _box(a.original_box),
                       png_to_pil(a.crop_png), png_to_pil(a.image_png), a.digest,
                       _geometry(a.geometry) if a.HasField("geometry") else None, png_to_pil(a.photo_png))
         for a in r.activations],
        images_scanned=r.images_scanned, channels=r.channels, dataset=r.dataset,
        stats=ChannelStats(s.images, s.mean, s.max, s.positive_fraction) if r.HasField("stats") else None)


def datasets(r: pb.ListDatasetsResponse) -> list[DatasetInfo]:
    return [DatasetInfo(d.name, d.description, d.image_count, d.skipped_count,
                        [IndexInfo(i.model, i.layer, _INDEX_STATES.get(i.state, "unknown"), i.images_done,
                                   i.images_total) for i in d.indexes], d.digest) for d in r.datasets]


def progress(p: pb.Progress) -> Progress:
    return Progress(step=p.step, total=p.total_steps, objectives=dict(p.objectives),
                    preview=png_to_pil(p.preview_png), octave=p.octave if p.HasField("octave") else None)


def _image(data: bytes) -> Image.Image:
    img = png_to_pil(data)
    if img is None:
        raise ValueError("the server sent a result without an image")
    return img


def maximize_result(r: pb.MaximizeUnitResult) -> MaximizeResult:
    settings: dict[str, Any] = {f.name: getattr(r.settings, f.name) for f in r.settings.DESCRIPTOR.fields}
    names: dict[str, Mapping[str, int]] = {"preset": _PRESETS, "parameterization": _PARAMETERIZATIONS}
    for key, table in names.items():  # enum numbers as the names the options take
        settings[key] = next((name for name, code in table.items() if code == settings[key]), settings[key])
    images = [MaximizeImage(_image(i.image_png), i.objective, predictions(i.predictions)) for i in r.images]
    return MaximizeResult(_image(r.image_png), r.objective, predictions(r.predictions), settings, images,
                          r.gram_similarity)


def _fields(message: Any, enums: Mapping[str, Mapping[str, int]] | None = None) -> dict[str, Any]:
    """A settings message as a plain dict (enum numbers as their names, repeated fields as lists)."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        if field.has_presence and not field.is_repeated and not message.HasField(field.name):
            continue  # an optional field the server left unset (e.g. no channel)
        value = getattr(message, field.name)
        if field.is_repeated:
            value = list(value)
        table = (enums or {}).get(field.name)
        if table is not None:
            value = next((name for name, code in table.items() if code == value), value)
        out[field.name] = value
    return out


def dream_result(r: pb.DreamResult) -> DreamResult:
    return DreamResult(_image(r.image_png), r.objective, r.input_objective, _fields(r.settings))


def style_result(r: pb.StyleTransferResult) -> StyleTransferResult:
    enums: dict[str, Mapping[str, int]] = {"optimizer": _OPTIMIZERS, "soften": _SOFTEN, "gram_normalization": _GRAMS,
                                           "init": _INITS, "style_distance": _DISTANCES}
    return StyleTransferResult(_image(r.image_png), r.style_loss, r.content_loss, r.total_loss,
                               r.initial_style_loss, _fields(r.settings, enums))


R = TypeVar("R")


def stream_event(resp: Any, decode_result: Callable[[Any], R]) -> Progress | R | None:
    """One event of MaximizeUnit/Dream/StyleTransfer (a oneof of progress or result); None if empty."""
    kind = resp.WhichOneof("event")
    if kind == "progress":
        return progress(resp.progress)
    if kind == "result":
        return decode_result(resp.result)
    return None
