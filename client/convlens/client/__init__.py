"""ConvLens Python SDK: look inside the CNNs a ConvLens server serves.

    from convlens.client import Client, Unit
    with Client("localhost:50051") as c:
        s = c.saliency("cat.jpg", "efficientnet_lite0", target=281, method="guided_backprop")
        s.overlay.save("cat_saliency.png")

Imports neither torch nor the server: this is the plain `pip install convlens`. The load tester is the
public module `convlens.client.loadtest`; the `convlens` command lives in `_cli`.
"""

from __future__ import annotations

from importlib import metadata as _metadata

from ._client import AsyncClient, Client
from ._config import TLS, Timeout
from ._convert import SALIENCY_METHODS as _SALIENCY_METHODS
from ._exceptions import (
    ConvLensError,
    DeadlineExceededError,
    FailedPreconditionError,
    FieldViolation,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    RequestCancelledError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
    UnknownError,
)
from ._types import (
    ChannelStats,
    DatasetInfo,
    DreamResult,
    Filters,
    Geometry,
    ImageInput,
    IndexInfo,
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
    TopActivation,
    TopActivations,
    Unit,
)

try:
    __version__ = _metadata.version("convlens")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

# The method names saliency() accepts, in the contract's order.
SALIENCY_METHODS: tuple[str, ...] = tuple(_SALIENCY_METHODS)

__all__ = [
    "SALIENCY_METHODS",
    "TLS",
    "AsyncClient",
    "ChannelStats",
    "Client",
    "ConvLensError",
    "DatasetInfo",
    "DeadlineExceededError",
    "DreamResult",
    "FailedPreconditionError",
    "FieldViolation",
    "Filters",
    "Geometry",
    "ImageInput",
    "IndexInfo",
    "InternalError",
    "InvalidArgumentError",
    "LayerInfo",
    "MaximizeImage",
    "MaximizeResult",
    "ModelDetails",
    "ModelInfo",
    "NotFoundError",
    "PermissionDeniedError",
    "Prediction",
    "Progress",
    "ReceptiveField",
    "RepositoryModel",
    "RequestCancelledError",
    "ResourceExhaustedError",
    "SaliencyResult",
    "StyleTransferResult",
    "Timeout",
    "TopActivation",
    "TopActivations",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "UnknownError",
    "Unit",
    "__version__",
]
