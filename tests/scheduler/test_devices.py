"""parse_devices: "auto", "cpu", explicit CUDA lists, and clear errors."""

from __future__ import annotations

import pytest
import torch

from convlens.server.scheduler import parse_devices


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def test_auto_without_cuda_is_cpu(no_gpu) -> None:
    assert parse_devices("auto") == [torch.device("cpu")]


def test_auto_with_cuda_is_every_gpu(two_gpus) -> None:
    assert parse_devices(" AUTO ") == [torch.device("cuda", 0), torch.device("cuda", 1)]


def test_explicit_lists(two_gpus) -> None:
    assert parse_devices("cpu") == [torch.device("cpu")]
    assert parse_devices("cuda:0, cuda:1") == [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert parse_devices("cuda") == [torch.device("cuda", 0)]


@pytest.mark.parametrize("spec,message", [
    ("", "expected 'auto'"),
    ("cpu,", "expected 'auto'"),
    ("tpu", "expected 'cpu', 'cuda' or 'cuda:N'"),
    ("cuda:x", "expected 'cpu', 'cuda' or 'cuda:N'"),
    ("cuda:2", "only 2 CUDA device"),
    ("cuda:0,cuda:0", "listed twice"),
])
def test_bad_specs(two_gpus, spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_devices(spec)


def test_cuda_without_cuda(no_gpu) -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):
        parse_devices("cuda:0")
