"""Hypothesis strategies for every request message of the contract, built from the .proto's descriptors.

A request is generated field by field from its message descriptor, so a field another issue adds is fuzzed
without a change here. Each scalar type draws mostly from values that exercise the server's checks: names
that exist and names that do not (empty, 5,000 characters, NUL bytes), zero / negative / huge integers, NaN
and infinities, enum numbers outside the enum, images that are valid, truncated, corrupt, empty or
decompression bombs, raw tensors whose byte count disagrees with their shape. `Vocabulary` says which names
the server under test knows, so that valid requests (which do compute) are drawn as well.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st
from PIL import Image

from convlens.v1 import convlens_pb2 as pb

I32 = (-(2**31), 2**31 - 1)
I64 = (-(2**63), 2**63 - 1)
# Fields whose values are sizes or counts: drawn mostly small and valid-looking, sometimes absurd.
SMALL_INTS = st.integers(-2, 40)
EDGE_INTS = st.sampled_from([0, -1, 1, 2, 3, 7, 64, 255, 256, 1000, 4096, 100_000, 2**31 - 1, -(2**31)])


@dataclass(frozen=True)
class Vocabulary:
    """What the server under test serves: names drawn most often, so that requests get past the lookups."""

    models: tuple[str, ...]
    layers: tuple[str, ...]
    datasets: tuple[str, ...] = ("samples",)
    channels: int = 16  # the widest layer's channel count; channels up to a little beyond it are drawn
    extra_strings: tuple[str, ...] = field(default=("", "nope", "x" * 5000, "conv1\x00", "ü/../..", " "))
    # Per model, its layers with a (C, H, W) map of at least 4 channels (for plausible requests); and the
    # models that take gradients.
    maps_of: dict[str, tuple[str, ...]] = field(default_factory=dict)
    gradient_models: tuple[str, ...] = ()


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A valid 8-bit greyscale PNG header that claims width x height pixels (2.5 gigapixels by default),
    whose data is a few kB: what a decompression-bomb upload looks like to the server."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" + b"\x00" * width
    compressor = zlib.compressobj(9)
    data = compressor.compress(row * 64) + compressor.flush()  # only the first rows: enough for a header check
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def _image_bytes() -> st.SearchStrategy[bytes]:
    rng = np.random.default_rng(0)
    good = png(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8))
    jpeg = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    fixed = [
        good,
        png(rng.integers(0, 256, (1, 1), dtype=np.uint8)),  # one grey pixel
        png(rng.integers(0, 256, (300, 2, 4), dtype=np.uint8)),  # RGBA, extreme aspect
        jpeg.getvalue(),
        good[: len(good) // 2],  # truncated
        good[:8],  # the signature only
        b"",
        b"GIF89a not really",
        bomb_png(),
        bomb_png(1, 1_000_000),
    ]
    return st.one_of(st.sampled_from(fixed), st.binary(max_size=64),
                     st.builds(lambda cut, flip: _corrupt(good, cut, flip), st.integers(0, len(good) - 1),
                               st.integers(0, 255)))


def _corrupt(data: bytes, at: int, value: int) -> bytes:
    return data[:at] + bytes([value]) + data[at + 1:]


DTYPES = {pb.Dtype.Value(n): np.dtype(n.split("_", 1)[1].lower()) for n in pb.Dtype.keys()
          if n != "DTYPE_UNSPECIFIED" and hasattr(np, n.split("_", 1)[1].lower())}


@st.composite
def tensors(draw: st.DrawFn) -> pb.Tensor:
    """A raw tensor: half consistent (shape, dtype and byte count agree; values may be NaN/Inf), half not."""
    dtype = draw(st.sampled_from([*DTYPES, 0, 99, -5]))
    shape = draw(st.one_of(
        st.tuples(st.integers(1, 24), st.integers(1, 24), st.sampled_from([0, 1, 2, 3, 4])).map(
            lambda t: [t[0], t[1], *([t[2]] if t[2] else [])]),
        st.lists(st.one_of(SMALL_INTS, EDGE_INTS), max_size=5)))
    np_dtype = DTYPES.get(dtype)
    sane = bool(shape) and all(0 <= s <= 4096 for s in shape) and int(np.prod(shape)) <= 24 * 24 * 4
    if np_dtype is not None and sane and draw(st.booleans()):
        if np_dtype.kind == "f":
            values = draw(st.sampled_from([0.0, 128.0, 255.0, -1.0, 1e30, float("nan"), float("inf")]))
            with np.errstate(over="ignore"):  # 1e30 as float16 is inf: one more value to send
                array = np.full(shape, values).astype(np_dtype)
        else:
            array = np.full(shape, draw(st.integers(0, 255)), dtype=np_dtype)
        data = array.astype(array.dtype.newbyteorder("<")).tobytes()
    else:
        data = draw(st.binary(max_size=256))
    return pb.Tensor(dtype=dtype, shape=shape, data=data)


@st.composite
def images(draw: st.DrawFn) -> pb.Image:
    kind = draw(st.sampled_from(["encoded", "encoded", "tensor", "unset"]))
    if kind == "encoded":
        return pb.Image(encoded=draw(_image_bytes()))
    if kind == "tensor":
        return pb.Image(tensor=draw(tensors()))
    return pb.Image()


class Requests:
    """Strategies for requests of each RPC of `convlens.v1.InspectionService`."""

    def __init__(self, vocabulary: Vocabulary) -> None:
        self.v = vocabulary
        self._names = {  # a served name four times in five, so that most requests reach the deeper checks
            "model": self._mostly(vocabulary.models),
            "layer": self._mostly(vocabulary.layers),
            "dataset": self._mostly(vocabulary.datasets),
        }

    def _mostly(self, names: tuple[str, ...]) -> st.SearchStrategy[str]:
        return st.integers(0, 4).flatmap(
            lambda i: st.sampled_from(names) if i else st.sampled_from(self.v.extra_strings))

    def for_rpc(self, rpc: str, plausible: float = 0.25) -> st.SearchStrategy[Message]:
        """Arbitrary requests, and a `plausible` share of careful ones (which mostly compute)."""
        method = pb.DESCRIPTOR.services_by_name["InspectionService"].methods_by_name[rpc]
        arbitrary = self.message(method.input_type, depth=0)
        careful = Plausible(self.v).message(method.input_type, depth=0)
        return st.integers(0, 99).flatmap(lambda i: careful if i < plausible * 100 else arbitrary)

    def message(self, descriptor: Descriptor, depth: int) -> st.SearchStrategy[Message]:
        if descriptor.full_name == "convlens.v1.Image":
            return images()
        if descriptor.full_name == "convlens.v1.Tensor":
            return tensors()
        cls = message_factory.GetMessageClass(descriptor)

        @st.composite
        def build(draw: st.DrawFn) -> Message:
            message = cls()
            chosen_oneofs = {o.name: draw(st.sampled_from([None, *(f.name for f in o.fields)]))
                             for o in descriptor.oneofs if not o.name.startswith("_")}
            for f in descriptor.fields:
                oneof = f.containing_oneof
                if oneof is not None and not oneof.name.startswith("_") and chosen_oneofs[oneof.name] != f.name:
                    continue
                if oneof is None or oneof.name.startswith("_"):
                    # Valid requests leave most knobs to the server: a field is set about half the time.
                    if not draw(st.booleans()):
                        continue
                self._set(draw, message, f, depth)
            return message

        return build()

    def _set(self, draw: st.DrawFn, message: Message, f: FieldDescriptor, depth: int) -> None:
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            key_f, value_f = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
            for _ in range(draw(st.integers(0, 3))):
                key = draw(self._scalar(key_f))
                value = draw(self._scalar(value_f)) if value_f.message_type is None else None
                if value is not None:
                    getattr(message, f.name)[key] = value
            return
        if f.is_repeated:
            count = draw(st.sampled_from([0, 1, 2, 3, 70]) if f.message_type is None else st.integers(0, 3))
            target = getattr(message, f.name)
            for _ in range(count):
                if f.message_type is not None:
                    if depth < 3:
                        target.add().CopyFrom(draw(self.message(f.message_type, depth + 1)))
                else:
                    target.append(draw(self._scalar(f)))
            return
        if f.message_type is not None:
            if depth < 3:
                getattr(message, f.name).CopyFrom(draw(self.message(f.message_type, depth + 1)))
            return
        setattr(message, f.name, draw(self._scalar(f)))

    def _scalar(self, f: FieldDescriptor) -> st.SearchStrategy[object]:
        t = f.type
        name = f.name
        if t == FieldDescriptor.TYPE_STRING:
            for key, strategy in self._names.items():
                if key in name:
                    return strategy
            return st.sampled_from(self.v.extra_strings) | st.text(max_size=12)
        if t == FieldDescriptor.TYPE_BOOL:
            return st.booleans()
        if t == FieldDescriptor.TYPE_ENUM:
            numbers = [v.number for v in f.enum_type.values]
            return st.sampled_from(numbers) | st.sampled_from([max(numbers) + 1, 99, -1])
        if t in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
            return st.one_of(
                st.floats(0.0, 2.0, width=32), st.floats(-10.0, 100.0, width=32),
                st.sampled_from([0.0, -1.0, 1e-9, 1e30, -1e30, float("nan"), float("inf"), float("-inf")]))
        if t == FieldDescriptor.TYPE_BYTES:
            return _image_bytes()
        lo, hi = I64 if t in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64) else I32
        if name in ("channel", "class_index"):
            return st.integers(-1, self.v.channels + 2) | EDGE_INTS
        if name in ("y", "x"):
            return st.integers(-2, 20) | EDGE_INTS
        if name in ("steps", "steps_per_octave", "octaves", "samples"):
            return st.integers(-1, 6) | EDGE_INTS  # valid runs stay short; absurd ones must be refused
        if name in ("size", "max_size"):
            return st.sampled_from([0, -1, 8, 16, 32, 48, 100_000, 2**31 - 1])
        return st.one_of(SMALL_INTS, EDGE_INTS, st.integers(lo, hi))


class Plausible(Requests):
    """Requests a careful caller could send: a served model (one that takes gradients, mostly) with one of its
    own map layers, small sizes and steps, known enum values, valid images. Most of them compute, so that
    batching, jobs and encoding are fuzzed as well as validation."""

    ALWAYS = frozenset({"model", "image", "content", "style", "layer", "content_layer"})

    def __init__(self, vocabulary: Vocabulary) -> None:
        super().__init__(vocabulary)
        self._model = vocabulary.models[0]

    def _layers(self) -> tuple[str, ...]:
        return self.v.maps_of.get(self._model) or self.v.layers

    def message(self, descriptor: Descriptor, depth: int) -> st.SearchStrategy[Message]:
        if descriptor.full_name == "convlens.v1.Image":
            rng = np.random.default_rng(1)
            return st.sampled_from([pb.Image(encoded=png(rng.integers(0, 256, (36, 30, 3), dtype=np.uint8))),
                                    pb.Image(tensor=pb.Tensor(dtype=pb.Dtype.Value("DTYPE_UINT8"), shape=[20, 24, 3],
                                                              data=bytes(20 * 24 * 3)))])
        cls = message_factory.GetMessageClass(descriptor)

        @st.composite
        def build(draw: st.DrawFn) -> Message:
            message = cls()
            if depth == 0:
                preferred = self.v.gradient_models or self.v.models
                self._model = draw(st.sampled_from(preferred) if draw(st.integers(0, 4))
                                   else st.sampled_from(self.v.models))
            for o in descriptor.oneofs:
                if not o.name.startswith("_"):
                    chosen = draw(st.sampled_from([None, *(f.name for f in o.fields)]))
                    if chosen is not None:
                        self._set(draw, message, descriptor.fields_by_name[chosen], depth)
            for f in descriptor.fields:
                oneof = f.containing_oneof
                if oneof is not None and not oneof.name.startswith("_"):
                    continue
                if f.name in self.ALWAYS or draw(st.booleans()):
                    self._set(draw, message, f, depth)
            return message

        return build()

    def _set(self, draw: st.DrawFn, message: Message, f: FieldDescriptor, depth: int) -> None:
        if f.is_repeated and f.message_type is None:
            target = getattr(message, f.name)
            for _ in range(draw(st.integers(0, 2))):
                target.append(draw(self._scalar(f)))
            return
        if f.is_repeated and f.message_type is not None and not f.message_type.GetOptions().map_entry:
            for _ in range(draw(st.integers(0, 2))):
                getattr(message, f.name).add().CopyFrom(draw(self.message(f.message_type, depth + 1)))
            return
        super()._set(draw, message, f, depth)

    def _scalar(self, f: FieldDescriptor) -> st.SearchStrategy[object]:
        t, name = f.type, f.name
        if t == FieldDescriptor.TYPE_STRING:
            if "model" in name:
                return st.just(self._model)
            if "layer" in name:
                return st.sampled_from(self._layers())
            if "dataset" in name:
                return st.sampled_from(self.v.datasets)
            return st.sampled_from(["", "a"])
        if t == FieldDescriptor.TYPE_BOOL:
            return st.booleans()
        if t == FieldDescriptor.TYPE_ENUM:
            return st.sampled_from([v.number for v in f.enum_type.values])
        if t in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
            return st.sampled_from([0.1, 0.25, 0.5, 1.0])
        if t == FieldDescriptor.TYPE_BYTES:
            return st.just(png(np.full((8, 8, 3), 128, dtype=np.uint8)))
        if name in ("size", "max_size"):
            return st.sampled_from([16, 32])
        if name in ("channel", "class_index"):
            return st.integers(0, 3)
        if name in ("y", "x"):
            return st.integers(0, 1)
        if name in ("k", "max_per_image", "samples", "steps", "steps_per_octave", "octaves"):
            return st.integers(1, 3)
        return st.integers(0, 3)
