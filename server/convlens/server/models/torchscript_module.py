"""A TorchScript model behind a plain nn.Module, so layer lookup works as for eager models.

ScriptModules refuse `get_submodule` (and forward hooks). This wrapper answers `get_submodule` and
`named_modules` with the scripted model's own layer names (`conv1`, not `scripted.conv1`), so filter
code reads `module.get_submodule(layer).weight` uniformly. Hooks still cannot be put on the layers
inside: activation-based engine functions see only the model's output.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn


class ScriptedModel(nn.Module):
    def __init__(self, scripted: torch.jit.ScriptModule) -> None:
        super().__init__()
        self.scripted = scripted

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scripted(x)

    def named_modules(self, memo: set[nn.Module] | None = None, prefix: str = "",
                      remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Module]]:
        yield prefix, self
        for name, sub in self.scripted.named_modules():
            if name:
                yield (f"{prefix}.{name}" if prefix else name), sub

    def get_submodule(self, target: str) -> nn.Module:
        if not target:
            return self
        module: nn.Module = self.scripted
        walked = []
        for part in target.split("."):
            walked.append(part)
            child = getattr(module, part, None)
            if not isinstance(child, nn.Module):
                raise AttributeError(f"TorchScript model has no submodule {'.'.join(walked)!r}")
            module = child
        return module
