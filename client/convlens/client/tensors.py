"""numpy <-> convlens.v1.Tensor for SDK users; the codec itself lives in `convlens.wire.tensors`."""

from convlens.wire.tensors import TensorError, to_numpy, to_tensor

__all__ = ["TensorError", "to_numpy", "to_tensor"]
