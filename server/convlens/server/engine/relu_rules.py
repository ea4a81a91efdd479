"""Guided backprop and deconvnet backward rules for every ReLU-family activation a model runs.

Captum and most libraries hook `nn.ReLU` modules only, so `nn.ReLU6` (EfficientNet-Lite, MobileNet),
functional `F.relu` (torchvision GoogLeNet's BasicConv2d) and inplace ReLUs silently keep the plain
gradient. Here a TorchFunctionMode intercepts the *functions* instead: `nn.ReLU`, `nn.ReLU6`,
`nn.Hardtanh(0, M)` and `nn.Threshold(0, 0)` call `torch.nn.functional`, which reaches the mode like any
functional or tensor-method call, so modules and functional calls are caught by the same mechanism.
Activations inside TorchScript code are invisible to the mode (saliency.py says so in its notes).

Rules, with x the activation's input, g its output gradient, (lo, hi) its linear range:
  guided backprop (Springenberg et al. 2014): grad_in = relu(g) * (lo < x < hi)
  deconvnet (Zeiler & Fergus 2014):           grad_in = relu(g)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.overrides import TorchFunctionMode

RULES = ("guided_backprop", "deconvnet")


class _ModifiedReLU(torch.autograd.Function):
    """clamp(x, 0, hi) forward; guided-backprop or deconvnet backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, hi: float, guided: bool) -> torch.Tensor:  # ctx: a FunctionCtx
        out = x.clamp(min=0.0) if math.isinf(hi) else x.clamp(0.0, hi)
        if guided:
            # Save the mask, not x: the model may overwrite x in place right after (inplace ReLU).
            mask = (x > 0) if math.isinf(hi) else (x > 0) & (x < hi)
            ctx.save_for_backward(mask)
        ctx.guided = guided
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        grad_in = grad_out.clamp(min=0.0)
        if ctx.guided:
            (mask,) = ctx.saved_tensors
            grad_in = grad_in * mask
        return grad_in, None, None


@dataclass(frozen=True)
class _Call:
    x: torch.Tensor
    hi: float  # upper end of the linear range (inf for ReLU)
    inplace: bool


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], i: int, name: str, default: Any) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


def _relu(args: tuple[Any, ...], kwargs: dict[str, Any], inplace: bool | None) -> _Call:
    flag = bool(_arg(args, kwargs, 1, "inplace", False)) if inplace is None else inplace
    return _Call(args[0], math.inf, flag)


def _relu6(args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Call:
    return _Call(args[0], 6.0, bool(_arg(args, kwargs, 1, "inplace", False)))


def _hardtanh(args: tuple[Any, ...], kwargs: dict[str, Any], inplace: bool | None) -> _Call | None:
    lo = float(_arg(args, kwargs, 1, "min_val", -1.0))
    hi = float(_arg(args, kwargs, 2, "max_val", 1.0))
    flag = bool(_arg(args, kwargs, 3, "inplace", False)) if inplace is None else inplace
    return _Call(args[0], hi, flag) if lo == 0.0 and hi > 0.0 else None  # hardtanh(0, hi) is ReLU-family


def _threshold(args: tuple[Any, ...], kwargs: dict[str, Any], inplace: bool | None) -> _Call | None:
    threshold = float(_arg(args, kwargs, 1, "threshold", math.nan))
    value = float(_arg(args, kwargs, 2, "value", math.nan))
    flag = bool(_arg(args, kwargs, 3, "inplace", False)) if inplace is None else inplace
    return _Call(args[0], math.inf, flag) if threshold == 0.0 and value == 0.0 else None


# Every entry point of a ReLU-family op, mapped to a parser of its arguments (None: not ReLU-family).
_PARSERS: dict[Callable[..., Any], Callable[[tuple[Any, ...], dict[str, Any]], _Call | None]] = {
    F.relu: lambda a, k: _relu(a, k, None),
    torch.relu: lambda a, k: _relu(a, k, False),
    torch.relu_: lambda a, k: _relu(a, k, True),
    torch.Tensor.relu: lambda a, k: _relu(a, k, False),
    torch.Tensor.relu_: lambda a, k: _relu(a, k, True),
    F.relu6: _relu6,
    F.hardtanh: lambda a, k: _hardtanh(a, k, None),
    F.hardtanh_: lambda a, k: _hardtanh(a, k, True),
    F.threshold: lambda a, k: _threshold(a, k, None),
    torch.threshold: lambda a, k: _threshold(a, k, False),
    torch.threshold_: lambda a, k: _threshold(a, k, True),
}


class _ReluOverride(TorchFunctionMode):
    def __init__(self, guided: bool) -> None:
        super().__init__()
        self.guided = guided
        self.count = 0

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        parser = _PARSERS.get(func)
        call = parser(args, kwargs) if parser is not None else None
        if call is None or not isinstance(call.x, torch.Tensor) or not torch.is_grad_enabled():
            return func(*args, **kwargs)
        # Nested calls here do not re-enter the mode (torch pops it while we handle a call).
        self.count += 1
        out = _ModifiedReLU.apply(call.x, call.hi, self.guided)
        if call.inplace:
            # Callers of an inplace op may keep using x rather than the result: write the result back.
            # copy_ makes the new x's gradient flow to `out` alone, as the native inplace op would.
            return call.x.copy_(out)
        return out


@dataclass
class Modified:
    """How many ReLU-family calls the last block replaced (over all forwards inside it)."""

    count: int = 0


@contextmanager
def modified_relus(rule: str | None) -> Iterator[Modified]:
    """Within the block, ReLU-family activations use `rule`'s backward; None leaves them alone."""
    result = Modified()
    if rule is None:
        yield result
        return
    if rule not in RULES:
        raise ValueError(f"unknown ReLU rule {rule!r}; expected one of {RULES}")
    mode = _ReluOverride(guided=rule == "guided_backprop")
    try:
        with mode:
            yield result
    finally:
        result.count = mode.count
