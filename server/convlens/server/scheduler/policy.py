"""How a device's worker batches: measured per device, not assumed (see ARCHITECTURE.md, the limits)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int = 8
    max_batch_delay: float = 0.005  # seconds a batch waits for companions once it has its first task

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_batch_delay < 0:
            raise ValueError(f"max_batch_delay must be >= 0 seconds, got {self.max_batch_delay}")


def policies_for(devices: list[torch.device],
                 policies: Mapping[str, BatchPolicy] | None) -> dict[str, BatchPolicy]:
    """One policy per device string; a policy for a device not served is a typo, so it is refused."""
    given = dict(policies or {})
    names = [str(d) for d in devices]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ValueError(f"batch policies given for devices not served: {unknown}; devices are {names}")
    return {name: given.get(name, BatchPolicy()) for name in names}
