"""Pieces every RPC's codec shares: images in, targets, tensors, predictions, geometry, PNG, deadlines."""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np
from PIL import Image

from convlens.server.engine import targets
from convlens.server.engine.predictions import Prediction
from convlens.server.engine.targets import ClassTarget, Target, UnitTarget
from convlens.server.errors import InvalidArgument
from convlens.server.models.preprocess import Geometry
from convlens.server.service.streaming import Progress
from convlens.server.transport.codecs.vocabulary import enum_names, enum_prefix, enum_values
from convlens.v1 import convlens_pb2 as pb
from convlens.wire.tensors import to_numpy, to_tensor

REDUCTIONS = enum_names(pb.Reduction, targets.REDUCTIONS, unspecified="mean")
REDUCTION_VALUES = enum_values(REDUCTIONS)


def enum(table: dict[int, str], value: int, field: str, enum_name: str) -> str:
    if value not in table:
        raise InvalidArgument(f"unknown {enum_name} value {value}", field=field)
    return table[value]


def given(message: object, name: str, default: object = None) -> Any:
    """An `optional` field's value when the caller set it (0 included), else `default` (the contract's one rule
    for defaults: presence, not zero)."""
    return getattr(message, name) if message.HasField(name) else default  # type: ignore[attr-defined]


def outputs(table: dict[int, str], values: Sequence[int], enum: Any) -> frozenset[str] | None:
    """A request's `outputs` (a repeated enum) as option names; None when empty (the RPC's default)."""
    if not values:
        return None
    names = set()
    for i, value in enumerate(values):
        if value not in table:
            choices = ", ".join(enum_prefix(enum) + name.upper() for name in table.values())
            raise InvalidArgument(f"outputs[{i}]: {value} is not a {enum.DESCRIPTOR.name}; name one of {choices}",
                                  field=f"outputs[{i}]")
        names.add(table[value])
    return frozenset(names)


def deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The call's gRPC deadline as a time.monotonic() deadline (None when unbounded)."""
    remaining = context.time_remaining()
    # A few ms early: the server drops a queued task itself, with its own message, just before grpc cancels
    # the call at the caller's deadline (on a busy loop grpc may still come first; the drop is counted as
    # "deadline" either way: Task.gone_reason).
    return None if remaining is None else time.monotonic() + remaining - 0.005


# ---------------------------------------------------------------- requests


def image_input(message: pb.Image, field: str) -> bytes | np.ndarray | None:
    kind = message.WhichOneof("source")
    if kind == "encoded":
        return bytes(message.encoded)
    if kind == "tensor":
        try:
            array = to_numpy(message.tensor)
        except ValueError as exc:
            raise InvalidArgument(str(exc), field=f"{field}.tensor") from None
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
            raise InvalidArgument(
                f"an image tensor is [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]; got shape {list(array.shape)}",
                field=f"{field}.tensor.shape")
        if array.dtype not in (np.uint8, np.float32):
            raise InvalidArgument(f"an image tensor is uint8 or float32 (0..255); got {array.dtype}",
                                  field=f"{field}.tensor.dtype")
        if min(array.shape[:2]) < 1:
            raise InvalidArgument("an image tensor has no pixels", field=f"{field}.tensor.shape")
        if array.dtype == np.float32 and not np.isfinite(array).all():
            raise InvalidArgument("an image tensor holds NaN or infinite values", field=f"{field}.tensor.data")
        return array
    return None


def optional_image(request: object, name: str) -> bytes | np.ndarray | None:
    """`request.<name>` (an Image field) converted, or None when the caller left it unset."""
    if not request.HasField(name):  # type: ignore[attr-defined]
        return None
    return image_input(getattr(request, name), name)


def target(message: pb.Target, has_field: bool, field: str = "target") -> Target | None:
    if not has_field:
        return None
    kind = message.WhichOneof("kind")
    if kind == "class_index":
        return ClassTarget(int(message.class_index))
    if kind == "unit":
        u = message.unit  # "both y and x or neither" is the engine's rule (targets.validate_target), not ours
        return UnitTarget(
            layer=u.layer, channel=int(u.channel),
            y=int(u.y) if u.HasField("y") else None, x=int(u.x) if u.HasField("x") else None,
            reduction=enum(REDUCTIONS, u.reduction, f"{field}.unit.reduction", "Reduction"))
    return None


# ---------------------------------------------------------------- responses


def png(image: Image.Image | None) -> bytes:
    """PNG bytes of a picture; empty bytes for none (proto3's unset `bytes`)."""
    if image is None:
        return b""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def prediction(p: Prediction) -> pb.Prediction:
    return pb.Prediction(class_index=p.class_index, label=p.label, logit=p.logit, probability=p.probability)


def geometry(g: Geometry) -> pb.Geometry:
    return pb.Geometry(
        original_height=g.original_height, original_width=g.original_width,
        resized_height=g.resized_height, resized_width=g.resized_width, crop_top=g.crop_top,
        crop_left=g.crop_left, input_height=g.input_height, input_width=g.input_width, scale=g.scale)


def target_message(t: Target) -> pb.Target:
    if isinstance(t, ClassTarget):
        return pb.Target(class_index=t.index)
    unit = pb.Unit(layer=t.layer, channel=t.channel,
                   reduction=REDUCTION_VALUES[t.reduction])
    if t.y is not None and t.x is not None:
        unit.y, unit.x = t.y, t.x
    return pb.Target(unit=unit)


def tensor(array: np.ndarray) -> pb.Tensor:
    return to_tensor(np.ascontiguousarray(array, dtype=np.float32))


def progress(event: Progress) -> pb.Progress:
    """One step of a streaming optimisation (MaximizeUnit, Dream, StyleTransfer)."""
    return pb.Progress(step=event.step, total_steps=event.total_steps, objectives=event.terms,
                       preview_png=png(event.preview), octave=event.octave)
