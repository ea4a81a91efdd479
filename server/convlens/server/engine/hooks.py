"""Scoped model instrumentation: every hook and state change made here is undone in `finally`.

Models are shared by every request a worker serves, so nothing may outlive one call: not a hook, not a
train/eval flip, not a torch function mode (see relu_rules.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as module_globals

from convlens.server.engine.layers import LayerResolver, resolver_for
from convlens.server.errors import FailedPrecondition

ForwardHook = Callable[[nn.Module, Any, Any], Any]
ForwardPreHook = Callable[[nn.Module, Any], Any]


def _observable(module: nn.Module) -> None:
    """FailedPrecondition for a layer inside TorchScript code, which refuses hooks (torch raises a bare
    RuntimeError that would reach the caller as INTERNAL)."""
    if isinstance(module, torch.jit.ScriptModule):
        raise FailedPrecondition("this layer is inside TorchScript code, whose layers cannot be observed "
                                 "(no forward hooks): serve the model as a torchvision state dict to use its "
                                 "inner layers; its output (class targets) works")


def forward_hook(module: nn.Module, hook: ForwardHook) -> Any:
    """`module.register_forward_hook(hook)`, or FailedPrecondition for a layer inside TorchScript code."""
    _observable(module)
    return module.register_forward_hook(hook)


def forward_pre_hook(module: nn.Module, pre_hook: ForwardPreHook) -> Any:
    """`module.register_forward_pre_hook(pre_hook)`, or FailedPrecondition for a layer inside TorchScript code."""
    _observable(module)
    return module.register_forward_pre_hook(pre_hook)


@contextmanager
def forward_hooks(hooks: Iterable[tuple[nn.Module, ForwardHook]],
                  pre_hooks: Iterable[tuple[nn.Module, ForwardPreHook]] = ()) -> Iterator[None]:
    """Register forward hooks (and forward pre-hooks) for the duration of the block: the one place the
    server instruments a module (tests/test_layering.py holds every other file to it), so none outlives
    its call. A layer inside TorchScript code is refused (FailedPrecondition) before any hook is made."""
    handles = []
    try:
        for module, hook in hooks:
            handles.append(forward_hook(module, hook))
        for module, pre_hook in pre_hooks:
            handles.append(forward_pre_hook(module, pre_hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class Captured:
    """Outputs of the captured layers from the last forward pass inside the block."""

    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)  # >1 when a module instance is reused

    def reused(self) -> list[str]:
        return [name for name, n in self.calls.items() if n > 1]


@contextmanager
def capture_outputs(
    model: nn.Module, layers: Iterable[str], *, field: str = "target.unit.layer",
    resolver: LayerResolver | None = None,
) -> Iterator[Captured]:
    """Capture the outputs of the named modules.

    The hook hands a clone downstream and keeps the original, so an inplace op after the layer (e.g.
    `ReLU(inplace=True)` after a conv) cannot overwrite what we captured: gradients and values are those
    of the layer itself (Captum clones for the same reason). A module called several times in one forward
    (a shared activation) keeps its last call's output. Names are resolved by `resolver` (the served
    model's; one is built for a bare module).
    """
    captured = Captured()
    names = list(dict.fromkeys(layers))
    if not names:  # nothing to capture: no lookup at all (the common class-logit case)
        yield captured
        return
    lookup = resolver_for(model, resolver)
    hooks = [(lookup.module(name, field=field), _capture_hook(name, captured)) for name in names]
    with forward_hooks(hooks):
        yield captured


def _capture_hook(name: str, captured: Captured) -> ForwardHook:
    def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
        captured.calls[name] = captured.calls.get(name, 0) + 1
        if not isinstance(output, torch.Tensor):
            return None
        captured.outputs[name] = output
        return output.clone()

    return hook


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode (BatchNorm running stats, no dropout), then restore each flag."""
    flags = [(m, m.training) for m in model.modules()]
    if not any(training for _, training in flags):  # served models always are: skip ~300 setattrs per call
        yield
        return
    try:
        model.eval()
        yield
    finally:
        for m, training in flags:
            m.training = training


def leftover_hooks(model: nn.Module) -> list[str]:
    """Names of modules (and global registries) still holding hooks; empty when nothing leaked."""
    attrs = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    left = [f"{name or '<root>'}.{a}" for name, m in model.named_modules() for a in attrs if getattr(m, a)]
    for a in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
              "_global_backward_pre_hooks"):
        if getattr(module_globals, a, None):
            left.append(f"<global>.{a}")
    return left


def function_mode_active() -> bool:
    """Whether any torch function mode (relu_rules' override) is still on the stack."""
    return bool(torch._C._len_torch_function_stack())
