"""One model folder of a --model-repo: `model.toml` beside its files -> a ServedModel.

    format = "torchvision" | "torchscript" | "onnx"
    arch = "resnet18"          # torchvision: any classification architecture
    weights = "weights.pt"     # torchvision: a state dict (loaded weights_only, strict)
    file = "model.pt"          # torchscript / onnx
    num_classes = 10           # torchvision; default: the labels file's length, else 1000
    labels = "labels.txt"      # optional, one a line
    description = "..."        # optional
    [preprocess]               # optional: size (int or [h, w]), resize, mean, std (0..1 scale)
"""

from __future__ import annotations

import tomllib
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from convlens.server.models.catalog import build_catalog
from convlens.server.models.labels import default_labels, read_labels
from convlens.server.models.model import Preprocess, ServedModel
from convlens.server.models.onnx_module import OnnxModule
from convlens.server.models.torchscript_module import ScriptedModel

CONFIG_FILE = "model.toml"
FORMATS = ("torchvision", "torchscript", "onnx")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_KNOWN_KEYS = {"format", "arch", "weights", "file", "num_classes", "labels", "description", "preprocess"}


class ModelConfigError(ValueError):
    """A model folder that cannot be served; the message says what to fix."""


def _file(folder: Path, config: dict[str, Any], key: str) -> Path:
    value = config.get(key)
    if not isinstance(value, str) or not value:
        raise ModelConfigError(f"{CONFIG_FILE}: `{key}` (a file name in the folder) is required")
    path = (folder / value).resolve()
    if folder.resolve() not in path.parents:
        raise ModelConfigError(f"{CONFIG_FILE}: `{key} = {value!r}` must stay inside the model folder")
    if not path.is_file():
        raise ModelConfigError(f"{CONFIG_FILE}: `{key}` file {value!r} not found in {folder}")
    return path


def _triple(table: dict[str, Any], key: str, default: tuple[float, float, float]) -> tuple[float, ...]:
    value = table.get(key, default)
    if isinstance(value, int | float):
        value = [value] * 3
    if not (isinstance(value, list | tuple) and len(value) == 3
            and all(isinstance(v, (int, float)) for v in value)):
        raise ModelConfigError(f"[preprocess] {key} must be three numbers (0..1 scale), got {value!r}")
    if key == "std" and any(v <= 0 for v in value):
        raise ModelConfigError(f"[preprocess] std must be positive, got {value!r}")
    return tuple(float(v) for v in value)


def parse_preprocess(table: Any, default_size: int | list[int] = 224) -> Preprocess:
    """[preprocess] with torchvision's ImageNet defaults: 224 crop of a 256 resize, ImageNet mean/std."""
    if table is None:
        table = {}
    if not isinstance(table, dict):
        raise ModelConfigError("[preprocess] must be a table")
    unknown = set(table) - {"size", "resize", "mean", "std"}
    if unknown:
        raise ModelConfigError(f"[preprocess] has unknown keys: {', '.join(sorted(unknown))}")
    size = table.get("size", default_size)
    if isinstance(size, int):
        height = width = size
    elif isinstance(size, list) and len(size) == 2 and all(isinstance(s, int) for s in size):
        height, width = size
    else:
        raise ModelConfigError(f"[preprocess] size must be an int or [height, width], got {size!r}")
    if height <= 0 or width <= 0:
        raise ModelConfigError(f"[preprocess] size must be positive, got {size!r}")
    resize = table.get("resize", int(round(max(height, width) * 256 / 224)))
    if not isinstance(resize, int) or resize <= 0:
        raise ModelConfigError(f"[preprocess] resize must be a positive int, got {resize!r}")
    mean = _triple(table, "mean", IMAGENET_MEAN)
    std = _triple(table, "std", IMAGENET_STD)
    return Preprocess(height, width, resize, mean, std)  # type: ignore[arg-type]


def _torchvision(folder: Path, config: dict[str, Any], num_classes: int) -> nn.Module:
    import torchvision

    arch = config.get("arch")
    if not isinstance(arch, str):
        raise ModelConfigError(f"{CONFIG_FILE}: `arch` (a torchvision model name) is required")
    available = set(torchvision.models.list_models(module=torchvision.models))
    if arch not in available:
        raise ModelConfigError(f"unknown torchvision arch {arch!r}; classification archs include: "
                               + ", ".join(sorted(available)[:12]) + ", ...")
    module = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    state = torch.load(_file(folder, config, "weights"), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # a training checkpoint
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelConfigError(f"weights do not fit {arch} with num_classes={num_classes}: "
                               + str(exc).strip().splitlines()[0][:400]) from None
    return module


def _num_classes(config: dict[str, Any], labels: list[str] | None) -> int:
    n = config.get("num_classes", len(labels) if labels else 1000)
    if not isinstance(n, int) or n <= 0:
        raise ModelConfigError(f"num_classes must be a positive int, got {n!r}")
    return n


def load_folder(folder: Path, name: str | None = None, version: int = 1) -> ServedModel:
    """The ServedModel of one model folder (named `name`, default the folder's); ModelConfigError (or the
    loader's error) if it can't be. A version folder (MODEL/2/) is a model folder of its own."""
    name = name or folder.name
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise ModelConfigError(f"no {CONFIG_FILE} in {folder}")
    try:
        config = tomllib.loads(config_path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ModelConfigError(f"{CONFIG_FILE} is not valid TOML: {exc}") from None
    unknown = set(config) - _KNOWN_KEYS
    if unknown:
        raise ModelConfigError(f"{CONFIG_FILE} has unknown keys: {', '.join(sorted(unknown))}")
    fmt = config.get("format")
    if fmt not in FORMATS:
        raise ModelConfigError(f"{CONFIG_FILE}: format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    labels = read_labels(_file(folder, config, "labels")) if "labels" in config else None
    description = config.get("description", "")
    if not isinstance(description, str):
        raise ModelConfigError("description must be a string")

    module: nn.Module
    if fmt == "torchvision":
        module = _torchvision(folder, config, _num_classes(config, labels))
    elif fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still loads
            module = ScriptedModel(torch.jit.load(str(_file(folder, config, "file")), map_location="cpu"))
    else:
        module = OnnxModule(_file(folder, config, "file"))
    module.eval()
    # An ONNX graph with a fixed input size knows its preprocessing size better than a default.
    fixed = module.input_hw if isinstance(module, OnnxModule) else None
    pre = parse_preprocess(config.get("preprocess"), default_size=list(fixed) if fixed else 224)

    # Running the model once at its input size checks it and gives the number of classes.
    with torch.no_grad():
        out = module(torch.zeros(1, 3, pre.height, pre.width))
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 1:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelConfigError(f"the model must return logits [batch, classes]; got {shape} "
                               f"for a 1x3x{pre.height}x{pre.width} input")
    n_out = int(out.shape[1])
    if labels is None:
        labels = default_labels(n_out)
    elif len(labels) != n_out:
        raise ModelConfigError(f"labels file has {len(labels)} lines, the model has {n_out} outputs")

    return ServedModel(
        name=name,
        version=version,
        format=fmt,
        module=module,
        preprocess=pre,
        labels=labels,
        supports_gradients=fmt != "onnx",
        layers=build_catalog(module, pre),
        description=description or (f"{config.get('arch', fmt)} from "
                                    f"{folder.name if folder.name == name else f'{name}/{folder.name}'}/"),
    )
