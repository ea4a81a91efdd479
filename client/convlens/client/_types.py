"""What the SDK hands back: small dataclasses of numpy arrays, PIL images and plain Python values.

Nothing here imports grpc or the generated code, so these types read as the SDK's vocabulary; `_convert.py`
is where protobuf messages become these and back.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict

import numpy as np
import numpy.typing as npt
from PIL import Image

Reduction = Literal["mean", "max"]
Parameterization = Literal["fft", "pixel", "maco"]
MaximizePreset = Literal["lucid", "lecture", "maco"]
Optimizer = Literal["lbfgs", "adam"]
Soften = Literal["none", "channels", "positions", "all"]
StyleDistance = Literal["mse", "relative"]
GramNormalization = Literal["positions", "elements", "none"]
StyleInit = Literal["content", "noise"]


@dataclass(frozen=True)
class Unit:
    """A channel of a layer: at one position of its output map (y and x), or reduced over the whole map."""

    layer: str
    channel: int
    y: int | None = None
    x: int | None = None
    reduction: Reduction = "mean"  # used only when y and x are unset

    def __post_init__(self) -> None:
        # The server would refuse it too, but a local error points at the caller's line.
        if (self.y is None) != (self.x is None):
            raise ValueError("Unit: give both y and x, or neither")
        if self.reduction not in ("mean", "max"):
            raise ValueError(f"Unit: reduction must be 'mean' or 'max', not {self.reduction!r}")


Target = int | Unit  # a class index (its logit) or a unit


@dataclass(frozen=True)
class ReceptiveField:
    """Output (y, x) sees size[0] input rows from offset[0] + y*jump[0] - (size[0]-1)/2; same for x."""

    size: tuple[int, int]  # (y, x)
    jump: tuple[int, int]
    offset: tuple[float, float]

    def box(self, y: int, x: int) -> tuple[int, int, int, int]:
        """The input pixels (x0, y0, x1, y1), half-open and unclipped, that output position (y, x) sees."""
        y0 = round(self.offset[0] + y * self.jump[0] - (self.size[0] - 1) / 2)
        x0 = round(self.offset[1] + x * self.jump[1] - (self.size[1] - 1) / 2)
        return x0, y0, x0 + self.size[1], y0 + self.size[0]


@dataclass(frozen=True)
class ModelInfo:
    name: str
    format: str  # "embedded", "torchvision", "torchscript" or "onnx"
    input_size: tuple[int, int]  # (h, w)
    num_classes: int
    resize: int  # short side before the center crop
    mean: tuple[float, ...]  # on the 0..1 scale, per RGB channel
    std: tuple[float, ...]
    supports_gradients: bool  # False: gradient techniques answer FailedPreconditionError
    parameter_count: int
    description: str
    version: int = 1  # the version this describes (NAME@VERSION in requests names one)


@dataclass(frozen=True)
class RepositoryModel:
    """One version of one model in the server's repository index (model control)."""

    name: str
    version: int  # 1 for a flat folder or an embedded model; 0: the folder has no readable version
    state: str  # "READY", "UNAVAILABLE" or "LOADING"
    reason: str  # why it is not READY (or what its last failed load said while an older copy serves)
    source: str  # "repository" or "embedded"
    default: bool  # serves calls that name no version

    @property
    def ref(self) -> str:
        """How a request names exactly this version."""
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class LayerInfo:
    name: str  # named_modules() name, e.g. "_blocks.10._depthwise_conv"
    type: str  # e.g. "Conv2d"
    output_shape: tuple[int, ...]  # for one image at the model's input size, e.g. (112, 14, 14)
    parameter_count: int
    receptive_field: ReceptiveField | None
    has_filters: bool  # get_filters can answer for it


@dataclass(frozen=True)
class ModelDetails:
    info: ModelInfo
    layers: list[LayerInfo]
    labels: list[str]

    def layer(self, name: str) -> LayerInfo:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"model {self.info.name!r} has no layer {name!r}")


@dataclass(frozen=True, eq=False)
class Filters:
    weights: npt.NDArray[np.float32]  # [out, in/groups, kh, kw]
    bias: npt.NDArray[np.float32] | None
    dead_channels: list[int]  # output channels whose following BatchNorm has running_var == 0
    grid: Image.Image | None
    layer_type: str
    groups: int
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]


@dataclass(frozen=True)
class Prediction:
    class_index: int
    label: str
    logit: float
    probability: float


@dataclass(frozen=True)
class Geometry:
    """Maps model-input pixels back to the caller's image: original = (input + crop offset) / scale.

    Field names follow the contract's Geometry message, so its documentation applies as is.
    """

    original_height: int
    original_width: int
    resized_height: int  # after the short-side resize, before the center crop
    resized_width: int
    crop_top: int
    crop_left: int
    input_height: int
    input_width: int
    scale: float  # resized / original; 1 when the image was used as is

    def to_original(self, y: float, x: float) -> tuple[float, float]:
        """A model-input position (y, x) in the caller's original image."""
        s = self.scale or 1.0
        return (y + self.crop_top) / s, (x + self.crop_left) / s


@dataclass(frozen=True, eq=False)
class SaliencyResult:
    attribution: npt.NDArray[np.float32] | None  # [C, H, W], in normalised-input units (None: not asked)
    heatmap: npt.NDArray[np.float32] | None  # [H, W] (None: not asked)
    overlay: Image.Image | None
    predictions: list[Prediction]  # top-5
    geometry: Geometry | None
    target: Target | None  # what was actually explained (the top-1 class when none was asked)
    target_value: float
    modified_activations: int  # ReLU-family activations changed (guided backprop, deconvnet)
    notes: list[str]
    # Integrated gradients: the target on the baseline; attribution.sum() ~= target_value - baseline_value.
    baseline_value: float | None = None


@dataclass(frozen=True, eq=False)
class TopActivation:
    """One entry of a unit's top list: an image region and how strongly it excites the unit."""

    image_index: int  # index into the caller's images, -1 for a dataset image
    source: str  # dataset-relative path (e.g. "skimage/coffee.png"), or "images[i]"
    score: float
    y: int  # position in the layer's output map
    x: int
    box: tuple[int, int, int, int]  # receptive field (x0, y0, x1, y1) in model-input pixels, clipped
    original_box: tuple[int, int, int, int]  # the same box in original-image pixels, clipped
    crop: Image.Image | None  # cut from the original-resolution image (crops=True)
    image: Image.Image | None  # the original image (<= 640 px) with the box drawn (include_images=True)
    digest: str = ""  # content digest: with `source`, the image's stable id
    geometry: Geometry | None = None
    photo: Image.Image | None = None  # the original image (<= 640 px) without the box (outputs "photos")


@dataclass(frozen=True)
class ChannelStats:
    """A channel over a whole dataset: a unit dead on it has max <= 0 and positive_fraction 0."""

    images: int
    mean: float
    max: float
    positive_fraction: float


class TopActivations(list[TopActivation]):
    """The entries, best first (a plain list), plus the channel's statistics over the dataset."""

    def __init__(self, entries: Iterable[TopActivation] = (), *, images_scanned: int = 0,
                 stats: ChannelStats | None = None, channels: int = 0, dataset: str = "") -> None:
        super().__init__(entries)
        self.images_scanned = images_scanned
        self.stats = stats
        self.channels = channels
        self.dataset = dataset

    @property
    def activations(self) -> list[TopActivation]:
        return list(self)


@dataclass(frozen=True)
class IndexInfo:
    model: str
    layer: str
    state: str  # "ready" | "building" | "absent"
    images_done: int
    images_total: int


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    description: str
    image_count: int
    skipped_count: int
    indexes: list[IndexInfo]
    digest: str


@dataclass(frozen=True, eq=False)
class Progress:
    step: int
    total: int
    objectives: dict[str, float]
    preview: Image.Image | None
    octave: int | None = None  # Dream: the octave the step ran in (0-based, smallest first)


@dataclass(frozen=True, eq=False)
class MaximizeImage:
    """One image of a MaximizeUnit job that optimised several (the `images` option)."""

    image: Image.Image
    objective: float  # the target's value on this image (no random transforms)
    predictions: list[Prediction]  # the model's top-5 on it


@dataclass(frozen=True, eq=False)
class MaximizeResult:
    image: Image.Image
    objective: float  # the target's value on the image (no random transforms)
    predictions: list[Prediction]  # the model's top-5 on the image
    # Every setting used, defaults resolved (preset, parameterization, steps, size, seed, ...): pass them
    # back as options to reproduce the image.
    settings: dict[str, Any] | None = None
    # With the `images` option above 1: every image of the job (the first is `image`), and their mean
    # pairwise Gram-matrix cosine similarity at the diversity layer (what `diversity` lowers).
    images: list[MaximizeImage] = field(default_factory=list)
    gram_similarity: float = 0.0


@dataclass(frozen=True, eq=False)
class DreamResult:
    image: Image.Image
    objective: float  # on the dream, by a plain forward pass
    input_objective: float = 0.0  # on the input at the same size (objective / input_objective: the gain)
    settings: dict[str, Any] | None = None  # as used: layer, octaves kept, step_size, jitter, seed, size...


@dataclass(frozen=True, eq=False)
class StyleTransferResult:
    image: Image.Image
    style_loss: float
    content_loss: float
    total_loss: float = 0.0  # style_weight * style_loss + content_weight * content_loss
    initial_style_loss: float = 0.0  # at the first step: 1 - style_loss / initial_style_loss is the drop
    settings: dict[str, Any] | None = None  # as used: layers, weights, soften, optimizer, size...


# Image inputs: a path, PIL image, HWC/HW array on the 0..255 scale, or encoded PNG/JPEG/WebP bytes.
ImageInput = str | os.PathLike[str] | bytes | bytearray | memoryview | Image.Image | npt.NDArray[Any]


# Keyword options of the streaming RPCs, shared by the plain and the iterator forms of Client and
# AsyncClient (one definition instead of four copies). Unset means "the server's default".
class MaximizeOptions(TypedDict, total=False):
    preset: MaximizePreset  # default "lucid"; every option below overrides it
    parameterization: Parameterization
    steps: int
    size: int
    learning_rate: float
    l2_decay: float
    blur_every: int
    blur_sigma: float
    jitter: int
    scale_jitter: float
    rotate_degrees: float
    seed: int
    preview_every: int
    value_percentile: float
    contribution_percentile: float
    tv_weight: float
    pad: int
    final_jitter: int
    decay_power: float
    images: int  # optimised together in one job, 1..16
    diversity: float  # weight of Lucid's diversity objective (needs images >= 2)
    diversity_layer: str  # where its Gram matrices are taken; default the target's layer


class DreamOptions(TypedDict, total=False):
    channel: int
    octaves: int
    octave_scale: float
    steps_per_octave: int
    step_size: float
    jitter: int
    guide: ImageInput
    seed: int
    preview_every: int
    max_size: int


class StyleTransferOptions(TypedDict, total=False):
    style_layers: Sequence[str]
    content_layer: str
    style_weight: float
    content_weight: float
    steps: int
    size: int
    optimizer: Optimizer
    soften: Soften | bool  # True: "channels"
    style_distance: StyleDistance  # per style layer: "mse" (Gatys) or "relative" (||G - G_s||^2 / ||G_s||^2)
    temperature: float
    gram_normalization: GramNormalization
    init: StyleInit
    learning_rate: float
    style_layer_weights: Sequence[float]
    seed: int
    preview_every: int
