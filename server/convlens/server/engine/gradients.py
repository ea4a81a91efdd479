"""One primitive every saliency method builds on: d target / d input for many rows at once.

Rows are processed in chunks to bound memory (SmoothGrad and integrated gradients send B * n rows). Each
row carries its own target; their values are summed and one backward per chunk gives each row its own
gradient, since the model is in eval mode (saliency.py ensures it).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import nn

from convlens.server.engine import interrupt
from convlens.server.engine.budget import CHUNK
from convlens.server.engine.hooks import capture_outputs
from convlens.server.engine.layers import LayerResolver, resolver_for
from convlens.server.engine.relu_rules import modified_relus
from convlens.server.engine.targets import Target, UnitTarget, resolve_targets, target_values

# CHUNK (engine/budget.py): rows per forward/backward at most; callers pass fewer for large inputs
# (budget.rows_per_chunk). Every chunk starts with interrupt.check(): a batch nobody waits for stops there.
__all__ = ["CHUNK", "Backprop", "accumulate", "backprop", "evaluate"]


@dataclass
class Backprop:
    grads: torch.Tensor  # [N, C, H, W] d target / d input
    values: torch.Tensor  # [N] target values (detached)
    logits: torch.Tensor  # [N, K] (detached)
    targets: list[Target]  # resolved (None -> top-1 class of that row)
    layer_outputs: torch.Tensor | None = None  # [N, ...] output of `layer` when asked (detached)
    layer_grads: torch.Tensor | None = None  # [N, ...] d target / d that output
    modified: int = 0  # ReLU-family calls replaced in one forward pass
    reused_layers: set[str] = field(default_factory=set)  # captured modules that ran more than once


def backprop(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: Sequence[Target | None],
    *,
    rule: str | None = None,
    layer: str | None = None,
    chunk: int = CHUNK,
    resolver: LayerResolver | None = None,
) -> Backprop:
    """Gradients of each row's target w.r.t. its input row (and w.r.t. `layer`'s output, if given).

    `rule` is a relu_rules rule (guided_backprop / deconvnet) or None for the plain gradient. The model
    must already be in eval mode, and `layer` a module of it (grad_cam.check_cam_layer). Layer names are
    resolved by `resolver` (the served model's; built once here for a bare module).
    """
    lookup = resolver_for(model, resolver)
    parts: list[Backprop] = []
    for s in range(0, inputs.shape[0], chunk):
        interrupt.check()
        parts.append(_backprop_chunk(model, inputs[s:s + chunk], targets[s:s + chunk], rule, layer, lookup))
    if len(parts) == 1:
        return parts[0]
    return Backprop(
        grads=torch.cat([p.grads for p in parts]),
        values=torch.cat([p.values for p in parts]),
        logits=torch.cat([p.logits for p in parts]),
        targets=[t for p in parts for t in p.targets],
        layer_outputs=_cat([p.layer_outputs for p in parts]),
        layer_grads=_cat([p.layer_grads for p in parts]),
        modified=max(p.modified for p in parts),
        reused_layers=set().union(*(p.reused_layers for p in parts)),
    )


def _backprop_chunk(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: Sequence[Target | None],
    rule: str | None,
    layer: str | None,
    lookup: LayerResolver,
) -> Backprop:
    # A fresh leaf: callers may hand us inference-mode or grad-requiring tensors.
    with torch.inference_mode(False), torch.enable_grad():
        x = inputs.detach().clone().requires_grad_(True)
        # One hook per module even when a unit and Grad-CAM share a layer: chained capture hooks would
        # each clone, and the unit's value would then bypass the tensor Grad-CAM differentiates.
        layers = [t.layer for t in targets if isinstance(t, UnitTarget)] + ([layer] if layer else [])
        with capture_outputs(model, layers, resolver=lookup) as captured, modified_relus(rule) as modified:
            logits = model(x)
        resolved = resolve_targets(logits, targets)
        values = target_values(logits, captured.outputs, resolved)
        wrt = [x]
        layer_output = captured.outputs.get(layer) if layer is not None else None
        if layer_output is not None:
            wrt.append(layer_output)
        grads = torch.autograd.grad(values.sum(), wrt, allow_unused=True)
    input_grad = grads[0] if grads[0] is not None else torch.zeros_like(x)
    return Backprop(
        grads=input_grad.detach(),
        values=values.detach(),
        logits=logits.detach(),
        targets=resolved,
        layer_outputs=None if layer_output is None else layer_output.detach(),
        layer_grads=None if layer_output is None else _or_zeros(grads[1], layer_output),
        modified=modified.count,
        reused_layers=set(captured.reused()),
    )


def _cat(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    tensors = [p for p in parts if p is not None]
    return torch.cat(tensors) if len(tensors) == len(parts) else None


def _or_zeros(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if grad is None else grad.detach()


def evaluate(model: nn.Module, inputs: torch.Tensor, targets: Sequence[Target | None], *,
             chunk: int = CHUNK, resolver: LayerResolver | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor, list[Target]]:
    """(logits [N, K], target values [N], resolved targets) without gradients: the unperturbed pass of
    the methods that differentiate elsewhere (SmoothGrad, integrated gradients)."""
    logits, values, resolved = [], [], []
    for s in range(0, inputs.shape[0], chunk):
        interrupt.check()
        part = targets[s:s + chunk]
        layers = [t.layer for t in part if isinstance(t, UnitTarget)]
        with torch.no_grad(), capture_outputs(model, layers, resolver=resolver) as captured:
            out = model(inputs[s:s + chunk])
            chosen = resolve_targets(out, part)
            values.append(target_values(out, captured.outputs, chosen))
        logits.append(out)
        resolved.extend(chosen)
    return torch.cat(logits), torch.cat(values), resolved


Key = TypeVar("Key", bound=Hashable)


def accumulate(
    model: nn.Module,
    rows: Iterable[tuple[Key, torch.Tensor, float]],
    target_of: Callable[[Key], Target],
    on_done: Callable[[Key, torch.Tensor], None],
    *,
    rule: str | None = None,
    chunk: int = CHUNK,
    resolver: LayerResolver | None = None,
) -> int:
    """Stream (group, input row [C, H, W], weight) rows through the model in chunks; call
    on_done(group, sum of weight * gradient) as each group completes. Returns the ReLU-family calls
    modified per forward.

    A group's rows must be contiguous in the stream. Only one chunk of rows and the groups it touches
    are held at a time, so B * samples * steps rows (SmoothGrad over integrated gradients) never are;
    and each group's sum runs in row order whatever the chunking, so a sample's result does not depend
    on its batch companions.
    """
    lookup = resolver_for(model, resolver)
    keys: list[Key] = []
    xs: list[torch.Tensor] = []
    weights: list[float] = []
    sums: dict[Key, torch.Tensor] = {}
    complete: list[Key] = []  # groups past their last row; emitted once those rows are flushed
    modified = 0

    def flush() -> None:
        nonlocal modified
        if xs:
            bp = backprop(model, torch.stack(xs), [target_of(k) for k in keys], rule=rule, chunk=chunk,
                          resolver=lookup)
            modified = max(modified, bp.modified)
            for key, weight, grad in zip(keys, weights, bp.grads, strict=True):
                sums[key] = sums[key] + weight * grad if key in sums else weight * grad
            keys.clear()
            xs.clear()
            weights.clear()
        for key in complete:
            on_done(key, sums.pop(key))
        complete.clear()

    current: list[Key] = []  # the group of the latest row, once there is one
    for key, x, weight in rows:
        if current and current[0] != key:
            complete.append(current[0])
        current[:] = [key]
        keys.append(key)
        xs.append(x)
        weights.append(weight)
        if len(xs) == chunk:
            flush()
    complete.extend(current)
    flush()
    return modified
