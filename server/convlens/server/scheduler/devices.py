"""Parse the --devices flag: "auto", "cpu", or a comma-separated list such as "cuda:0,cuda:1"."""

from __future__ import annotations

import torch


def parse_devices(spec: str) -> list[torch.device]:
    """"auto" = every visible CUDA device (or [cpu] when there is none); otherwise an explicit list.

    Every error says what was wrong and what is accepted, since it ends up in front of an operator.
    """
    text = spec.strip().lower()
    if text == "auto":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [torch.device("cuda", i) for i in range(n)] or [torch.device("cpu")]
    parts = [p.strip() for p in text.split(",")]
    if not text or any(not p for p in parts):
        raise ValueError(f"bad device list {spec!r}: expected 'auto', 'cpu' or e.g. 'cuda:0,cuda:1'")
    devices: list[torch.device] = []
    for part in parts:
        device = _one(part, spec)
        if device in devices:
            raise ValueError(f"bad device list {spec!r}: {device} is listed twice")
        devices.append(device)
    return devices


def _one(part: str, spec: str) -> torch.device:
    if part == "cpu":
        return torch.device("cpu")
    kind, _, index = part.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise ValueError(f"bad device {part!r} in {spec!r}: expected 'cpu', 'cuda' or 'cuda:N'")
    if not torch.cuda.is_available():
        raise ValueError(f"device {part!r} requested but CUDA is not available here; use 'cpu' or 'auto'")
    i = int(index) if index else 0
    count = torch.cuda.device_count()
    if i >= count:
        raise ValueError(f"device {part!r} requested but only {count} CUDA device(s) are visible "
                         f"(cuda:0..cuda:{count - 1})")
    return torch.device("cuda", i)
