"""An in-process ConvLens server (real scheduler, services, servicer and interceptor) serving a tiny
EfficientNet-like network: fast enough for the streaming optimisations' end-to-end tests."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import numpy as np
import pytest
import torch
from torch import nn

from convlens.client import AsyncClient
from convlens.server.app import ConvLensServer
from convlens.server.config import ServerConfig
from convlens.server.models.catalog import build_catalog
from convlens.server.models.model import Preprocess, ServedModel
from convlens.server.models.repository import ModelRepository

MODEL = "tinylite"


class TinyLite(nn.Module):
    """Stem (stride 2), two stride-2 stages and a head: layers at strides 2, 4 and 8."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self._conv_stem = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self._act0 = nn.ReLU6()
        self.stage1 = nn.Sequential(nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.ReLU6())
        self.stage2 = nn.Sequential(nn.Conv2d(12, 16, 3, stride=2, padding=1), nn.ReLU6())
        self._fc = nn.Linear(16, 5)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.stage1(self._act0(self._conv_stem(x))))
        return self._fc(x.mean(dim=(2, 3)))


def tiny_model() -> ServedModel:
    module = TinyLite().eval()
    pre = Preprocess(32, 32, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    return ServedModel(name=MODEL, format="embedded", module=module, preprocess=pre,
                       labels=[f"class {i}" for i in range(5)], supports_gradients=True,
                       layers=build_catalog(module, pre))


def photo(h: int = 48, w: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@contextlib.asynccontextmanager
async def tiny_server(max_jobs: int = 64) -> AsyncIterator[ConvLensServer]:
    """An in-process server of the tiny network on a free port (also tests/reliability/test_streams.py's)."""
    srv = ConvLensServer(ServerConfig(host="127.0.0.1", port=0, metrics=False, embedded=False, device="cpu",
                                      max_jobs=max_jobs, grace_seconds=0.0),
                         repository=ModelRepository([tiny_model()]))
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop(0.0)


@pytest.fixture()
async def server(request: pytest.FixtureRequest) -> AsyncIterator[ConvLensServer]:
    async with tiny_server(getattr(request, "param", 64)) as srv:
        yield srv


@pytest.fixture()
async def client(server: ConvLensServer) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(f"127.0.0.1:{server.port}", timeout=60) as c:
        yield c
