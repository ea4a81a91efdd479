"""numpy <-> convlens.v1.Tensor (C-order, little-endian). Used by the SDK and the server alike."""

from __future__ import annotations

import numpy as np

from convlens.v1 import convlens_pb2 as pb

_TO_NUMPY: dict[pb.Dtype.ValueType, np.dtype] = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_FLOAT16: np.dtype("<f2"),
    pb.DTYPE_FLOAT64: np.dtype("<f8"),
    pb.DTYPE_UINT8: np.dtype("u1"),
    pb.DTYPE_INT32: np.dtype("<i4"),
    pb.DTYPE_INT64: np.dtype("<i8"),
}
_FROM_NUMPY: dict[np.dtype, pb.Dtype.ValueType] = {v.newbyteorder("="): k for k, v in _TO_NUMPY.items()}


class TensorError(ValueError):
    """A Tensor message that does not describe a valid array."""


def to_tensor(array: np.ndarray) -> pb.Tensor:
    arr = np.asarray(array)
    dtype = _FROM_NUMPY.get(arr.dtype.newbyteorder("="))
    if dtype is None:
        raise TensorError(f"unsupported dtype {arr.dtype}; use one of float32, float16, float64, uint8, int32, int64")
    le = np.ascontiguousarray(arr, dtype=_TO_NUMPY[dtype])
    return pb.Tensor(dtype=dtype, shape=list(arr.shape), data=le.tobytes())


def to_numpy(tensor: pb.Tensor) -> np.ndarray:
    dtype = _TO_NUMPY.get(tensor.dtype)
    if dtype is None:
        name = pb.Dtype.Name(tensor.dtype) if tensor.dtype in pb.Dtype.values() else str(tensor.dtype)
        raise TensorError(f"unsupported tensor dtype {name}")
    shape = tuple(int(s) for s in tensor.shape)
    if any(s < 0 for s in shape):
        raise TensorError(f"negative dimension in shape {list(shape)}")
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(tensor.data) != expected:
        raise TensorError(
            f"shape {list(shape)} of {np.dtype(dtype).name} needs {expected} bytes, got {len(tensor.data)}")
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=True)
