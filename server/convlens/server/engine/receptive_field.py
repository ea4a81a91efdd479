"""Receptive fields read off the real computation graph, not off a layer list.

One forward pass runs under a TorchDispatchMode that gives every tensor computed from the input a
field: for output position (0, 0), the inclusive input-pixel interval [lo, hi] it depends on and the
jump (input pixels per output step), per axis. Each aten op composes its inputs' fields:

- convolution / pooling: kernel, stride, padding, dilation (whatever called them: module or F.*);
- constant_pad_nd and friends (TF "SAME" padding done with F.pad), slicing: shifts and crops;
- ops that keep the last two (spatial) dims — elementwise, batch norm, add, cat on channels,
  views — take the union of their inputs' fields;
- anything else that changes the spatial dims (adaptive pooling, spatial means, flatten, linear,
  interpolation, transposed conv) covers the whole input ("global").

Module forward hooks then read the field of each module's output. A global field is reported with
jump 0 and the whole input as its box, so `ReceptiveField.box` is right for every position.

Limits: TorchScript submodules cannot take hooks, so only their conv layers get fields (found through
their weight tensors); ONNX models run outside torch and get None. The field is the dependency
region (what can influence the unit), not the effective one (where gradients are large).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from convlens.server.engine.hooks import ForwardHook, forward_hooks


@dataclass(frozen=True)
class ReceptiveField:
    """Receptive field of one output position, in input pixels.

    Output position (y, x) is centred on input (offset_y + y * jump_y, offset_x + x * jump_x)
    and spans size_y x size_x pixels around that centre.
    """

    size_y: int
    size_x: int
    jump_y: int
    jump_x: int
    offset_y: float
    offset_x: float

    def box(self, y: int, x: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), half-open, unclipped, of output position (y, x)."""
        cy = self.offset_y + y * self.jump_y
        cx = self.offset_x + x * self.jump_x
        y0 = int(round(cy - (self.size_y - 1) / 2))
        x0 = int(round(cx - (self.size_x - 1) / 2))
        return x0, y0, x0 + self.size_x, y0 + self.size_y


@dataclass(frozen=True)
class _Axis:
    lo: int  # first input pixel of output position 0 (may be negative: padding)
    hi: int  # last input pixel of output position 0
    jump: int


@dataclass(frozen=True)
class _Field:
    y: _Axis
    x: _Axis


class _Global:
    """Depends on the whole input (no spatial structure left)."""


class _Unknown:
    """An op we could not follow; poisons whatever is computed from it."""


GLOBAL = _Global()
UNKNOWN = _Unknown()
Field = _Field | _Global | _Unknown


def _pair(v: Any, default: int | None = None) -> tuple[int, int]:
    if v is None or (isinstance(v, (list, tuple)) and len(v) == 0):
        if default is None:
            raise ValueError("missing pool/conv parameter")
        return default, default
    if isinstance(v, (list, tuple)):
        return (int(v[0]), int(v[0])) if len(v) == 1 else (int(v[0]), int(v[1]))
    return int(v), int(v)


def _window(a: _Axis, kernel: int, stride: int, padding: int, dilation: int) -> _Axis:
    # Output i reads input positions [i*s - p, i*s - p + d*(k-1)], each already a field of its own.
    return _Axis(a.lo - padding * a.jump, a.hi + (dilation * (kernel - 1) - padding) * a.jump,
                 a.jump * stride)


def _shift(a: _Axis, before: int) -> _Axis:
    # Padding `before` pixels moves position 0 back; negative padding crops.
    return _Axis(a.lo - before * a.jump, a.hi - before * a.jump, a.jump)


def _union(fields: Iterable[Field]) -> Field:
    fields = list(fields)
    if any(isinstance(f, _Unknown) for f in fields):
        return UNKNOWN
    if any(isinstance(f, _Global) for f in fields):
        return GLOBAL
    first = fields[0]
    assert isinstance(first, _Field)
    axes = []
    for name in ("y", "x"):
        parts = [getattr(f, name) for f in fields]
        if len({p.jump for p in parts}) != 1:
            return UNKNOWN  # same map size, different strides: not a shift-invariant field
        axes.append(_Axis(min(p.lo for p in parts), max(p.hi for p in parts), parts[0].jump))
    return _Field(axes[0], axes[1])


_POOLS = {"max_pool2d", "max_pool2d_with_indices", "avg_pool2d", "mkldnn_max_pool2d"}
_PADS = {"constant_pad_nd", "reflection_pad2d", "replication_pad2d", "_pad_circular"}


class ReceptiveFieldMode(TorchDispatchMode):
    """Tags tensors computed from the tensors given to `track` with their receptive fields."""

    def __init__(self, weight_owners: dict[str, torch.Tensor] | None = None) -> None:
        TorchDispatchMode.__init__(self)
        self.fields: WeakIdKeyDictionary = WeakIdKeyDictionary()
        # For modules that cannot take hooks (TorchScript): conv outputs recognised by their weight.
        self._weight_owners = {id(w): (name, w) for name, w in (weight_owners or {}).items()}
        self.by_weight: dict[str, tuple[tuple[int, ...], Field]] = {}

    def track(self, x: torch.Tensor) -> None:
        self.fields[x] = _Field(_Axis(0, 0, 1), _Axis(0, 0, 1))

    def field_of(self, t: torch.Tensor) -> Field | None:
        field: Field | None = self.fields.get(t)
        return field

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        tagged = [(t, self.fields[t]) for t in inputs if t in self.fields]
        if not tagged:
            return out
        outputs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        for o in outputs:
            try:
                field = self._compose(func, args, tagged, o)
            except Exception:  # an op with arguments we did not expect: do not break the forward
                field = UNKNOWN
            self.fields[o] = field
        if func.overloadpacket.__name__ == "convolution" and id(args[1]) in self._weight_owners:
            name, _ = self._weight_owners[id(args[1])]
            self.by_weight[name] = (tuple(outputs[0].shape[1:]), self.fields[outputs[0]])
        return out

    def _compose(self, func: Any, args: tuple[Any, ...], tagged: list[tuple[torch.Tensor, Field]],
                 out: torch.Tensor) -> Field:
        name = func.overloadpacket.__name__
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        main = self.fields.get(first) if first is not None else None
        others = [f for t, f in tagged if t is not first]
        if main is not None and isinstance(main, _Field) and not others and first is not None \
                and first.ndim >= 3:
            if name == "convolution":
                weight, stride, padding, dilation, transposed = args[1], args[3], args[4], args[5], args[6]
                if transposed or weight.ndim != 4:
                    return GLOBAL
                (ky, kx), (sy, sx) = weight.shape[2:], _pair(stride)
                (py, px), (dy, dx) = _pair(padding), _pair(dilation)
                return _Field(_window(main.y, ky, sy, py, dy), _window(main.x, kx, sx, px, dx))
            if name in _POOLS:
                ky, kx = _pair(args[1])
                # An empty stride means "the kernel size".
                sy, sx = _pair(args[2]) if len(args) > 2 and len(args[2]) else (ky, kx)
                py, px = _pair(args[3] if len(args) > 3 else 0)
                dy, dx = (1, 1) if name == "avg_pool2d" else _pair(args[4] if len(args) > 4 else 1)
                return _Field(_window(main.y, ky, sy, py, dy), _window(main.x, kx, sx, px, dx))
            if name in _PADS:
                pad = list(args[1])
                x_axis = _shift(main.x, pad[0]) if len(pad) >= 2 else main.x
                y_axis = _shift(main.y, pad[2]) if len(pad) >= 4 else main.y
                return _Field(y_axis, x_axis)
            if name == "slice":
                dim = int(args[1]) % first.ndim if len(args) > 1 else 0
                if dim >= first.ndim - 2:
                    size = first.shape[dim]
                    start = int(args[2]) if len(args) > 2 and args[2] is not None else 0
                    start = max(0, start + size if start < 0 else start)
                    step = int(args[4]) if len(args) > 4 else 1
                    ax = main.y if dim == first.ndim - 2 else main.x
                    ax = _Axis(ax.lo + start * ax.jump, ax.hi + start * ax.jump, ax.jump * step)
                    return _Field(ax, main.x) if dim == first.ndim - 2 else _Field(main.y, ax)
        # Everything else: same spatial size as every spatial input -> union; otherwise global.
        if out.ndim < 3:
            return GLOBAL if not any(isinstance(f, _Unknown) for _, f in tagged) else UNKNOWN
        fields: list[Field] = []
        for t, f in tagged:
            if isinstance(f, _Field) and (t.ndim < 3 or tuple(t.shape[-2:]) != tuple(out.shape[-2:])):
                return GLOBAL
            fields.append(f)
        return _union(fields)


def to_receptive_field(field: Field | None, input_hw: tuple[int, int]) -> ReceptiveField | None:
    """The public form of a field; global fields span the input with jump 0; unknown -> None."""
    if field is None or isinstance(field, _Unknown):
        return None
    h, w = input_hw
    if isinstance(field, _Global):
        return ReceptiveField(h, w, 0, 0, (h - 1) / 2, (w - 1) / 2)
    return ReceptiveField(
        size_y=field.y.hi - field.y.lo + 1, size_x=field.x.hi - field.x.lo + 1,
        jump_y=field.y.jump, jump_x=field.x.jump,
        offset_y=(field.y.lo + field.y.hi) / 2, offset_x=(field.x.lo + field.x.hi) / 2,
    )


@dataclass(frozen=True)
class LayerTrace:
    output_shape: tuple[int, ...]  # one image; () when the module did not run
    receptive_field: ReceptiveField | None


def _first_tensor(value: Any) -> torch.Tensor | None:
    for leaf in tree_flatten(value)[0]:
        if isinstance(leaf, torch.Tensor):
            return leaf
    return None


def trace_layers(module: nn.Module, example: torch.Tensor, *,
                 receptive_fields: bool = True) -> dict[str, LayerTrace]:
    """Output shape and receptive field of every named module in one forward of `example` [1,3,H,W].

    A module called several times reports its last call (torchvision's shared ReLUs: the one after
    the residual add). If tracing itself fails, shapes are still returned, with fields None.
    """
    if receptive_fields:
        try:
            return _trace(module, example, tracing=True)
        except Exception:
            pass
    return _trace(module, example, tracing=False)


def _trace(module: nn.Module, example: torch.Tensor, *, tracing: bool) -> dict[str, LayerTrace]:
    input_hw = (int(example.shape[-2]), int(example.shape[-1]))
    seen: dict[str, tuple[tuple[int, ...], Field | None]] = {}
    # ScriptModule children refuse hooks; their conv outputs are recognised by their weights instead.
    unhookable = {name: sub.weight for name, sub in module.named_modules()
                  if isinstance(sub, torch.jit.ScriptModule)
                  and isinstance(getattr(sub, "weight", None), torch.Tensor) and sub.weight.ndim == 4}
    mode = ReceptiveFieldMode(unhookable)

    def make_hook(name: str) -> ForwardHook:
        def hook(_m: nn.Module, _inp: Any, output: Any) -> None:
            t = _first_tensor(output)
            if t is not None:
                seen[name] = (tuple(t.shape[1:]), mode.field_of(t) if tracing else None)
        return hook

    hooks = [(sub, make_hook(name)) for name, sub in module.named_modules()
             if not isinstance(sub, torch.jit.ScriptModule)]
    with forward_hooks(hooks):
        x = example.detach().clone()
        with torch.no_grad():
            if tracing:
                with mode:
                    mode.track(x)
                    module(x)
            else:
                module(x)
    for name, (shape, field) in mode.by_weight.items():
        seen.setdefault(name, (shape, field if tracing else None))
    return {name: LayerTrace(shape, to_receptive_field(field, input_hw))
            for name, (shape, field) in seen.items()}


def receptive_fields(module: nn.Module, input_shape: tuple[int, int],
                     device: torch.device | None = None) -> dict[str, ReceptiveField | None]:
    """Receptive field of every module that runs, for a (H, W) input."""
    example = torch.zeros(1, 3, *input_shape, device=device)
    return {name: t.receptive_field for name, t in trace_layers(module, example).items()}
