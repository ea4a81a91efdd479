"""How a device's worker batches and lays out its tensors: measured per device, not assumed.

See docs/performance.md for the measurements and docs/architecture.md for where this sits.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

# Memory layout of every replica's weights (and so of every activation after the first conv), per device
# kind. channels_last (NHWC) lets oneDNN on the CPU run convolutions, depthwise ones above all, without
# converting layouts: EfficientNet-Lite0 forward + backward on the 2-core CPU ran 1.35-1.8x faster than in
# the default contiguous layout (docs/performance.md, the bench's layout x batch table). On CUDA it is
# cuDNN's preferred layout for convnets (not measured here: no GPU was lent). Results equal the contiguous
# ones within float tolerance (tests/scheduler/test_layout.py).
MEMORY_FORMATS: dict[str, torch.memory_format] = {"cpu": torch.channels_last, "cuda": torch.channels_last}


def memory_format_for(device: torch.device) -> torch.memory_format:
    return MEMORY_FORMATS.get(device.type, torch.contiguous_format)


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int = 8
    max_batch_delay: float = 0.005  # seconds a batch waits for companions once it has its first task
    # CPU only: compute threads that split each batch of two or more tasks between them, each with its share
    # of torch's intra-op threads and its own replicas (a lone task runs on the worker with all of them).
    # See worker.py's module docstring for why this beats one batch on all cores.
    shards: int = 1

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_batch_delay < 0:
            raise ValueError(f"max_batch_delay must be >= 0 seconds, got {self.max_batch_delay}")
        if self.shards < 1:
            raise ValueError(f"shards must be >= 1, got {self.shards}")


def policies_for(devices: list[torch.device],
                 policies: Mapping[str, BatchPolicy] | None) -> dict[str, BatchPolicy]:
    """One policy per device string; a policy for a device not served is a typo, so it is refused."""
    given = dict(policies or {})
    names = [str(d) for d in devices]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ValueError(f"batch policies given for devices not served: {unknown}; devices are {names}")
    gpu_shards = sorted(n for n, p in given.items() if p.shards > 1 and not n.startswith("cpu"))
    if gpu_shards:
        raise ValueError(f"shards > 1 splits a batch between CPU threads; devices {gpu_shards} are not CPUs")
    return {name: given.get(name, BatchPolicy()) for name in names}
