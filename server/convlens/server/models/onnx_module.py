"""An ONNX model behind an nn.Module face: onnxruntime does the forward, torch sees the conv layers.

`named_modules()` lists one pseudo-module per Conv node (named after its weight, `conv1` for
`conv1.weight`, else after the exporter's node scope), carrying `weight`/`bias` as torch tensors and
stride/padding/dilation/groups, so filter code reads `get_submodule(layer).weight` as for torch
models. Forward hooks on those pseudo-modules fire with the conv's output, which onnxruntime returns
as an extra graph output, so activation code works too. Forward-only: no autograd through
onnxruntime, and a hook's returned value cannot change the rest of the forward.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from convlens.server.models.model import forward_only


class OnnxConv(nn.Module):
    """One Conv node: its weights and hyper-parameters. Called only to fire hooks on its output."""

    def __init__(self, node: onnx.NodeProto, weight: np.ndarray, bias: np.ndarray | None) -> None:
        super().__init__()
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        self.weight = nn.Parameter(torch.from_numpy(weight.copy()), requires_grad=False)
        self.bias = (nn.Parameter(torch.from_numpy(bias.copy()), requires_grad=False)
                     if bias is not None else None)
        self.out_channels, in_per_group, *kernel = weight.shape
        self.kernel_size = tuple(int(k) for k in kernel)
        self.groups = int(attrs.get("group", 1))
        self.in_channels = in_per_group * self.groups
        self.stride = tuple(int(s) for s in attrs.get("strides", [1] * len(kernel)))
        self.dilation = tuple(int(d) for d in attrs.get("dilations", [1] * len(kernel)))
        pads = [int(p) for p in attrs.get("pads", [0] * 2 * len(kernel))]
        half = len(pads) // 2
        # torch's (pad_y, pad_x) when symmetric; ONNX's (begin..., end...) otherwise.
        self.padding: tuple[int, ...] = tuple(pads[:half]) if pads[:half] == pads[half:] else tuple(pads)
        auto_pad = attrs.get("auto_pad", b"NOTSET")
        self.auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
        self.node_name = node.name
        self.output_name = node.output[0]
        self._captured: torch.Tensor | None = None

    def forward(self, *_: Any) -> torch.Tensor:
        if self._captured is None:
            raise RuntimeError(f"{self.node_name}: an ONNX layer runs only inside its model's forward")
        return self._captured

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, groups={self.groups}")


def _scope_name(node_name: str) -> str | None:
    """'/layer2/layer2.0/downsample/downsample.0/Conv' -> 'layer2.0.downsample.0' (torch exporter)."""
    if not node_name.startswith("/"):
        return None
    parts: list[str] = []
    for seg in node_name.strip("/").split("/")[:-1]:
        if parts and seg.startswith(parts[-1] + "."):
            parts[-1] = seg
        else:
            parts.append(seg)
    return ".".join(parts) or None


def _layer_name(node: onnx.NodeProto, weight_name: str, index: int) -> str:
    if weight_name.endswith(".weight") and not weight_name.startswith("onnx::"):
        return weight_name.removesuffix(".weight")
    return _scope_name(node.name) or node.name or f"conv_{index}"


class OnnxModule(nn.Module):
    def __init__(self, path: Path) -> None:
        super().__init__()
        model = onnx.load(str(path))
        graph = model.graph
        constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        for node in graph.node:  # some exporters put weights in Constant nodes
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        self.input_name = next(i.name for i in graph.input if i.name not in constants)
        self.output_name = graph.output[0].name
        dims = next(i for i in graph.input if i.name == self.input_name).type.tensor_type.shape.dim
        # A model exported with a fixed batch of 1 runs a batch one image at a time.
        self.fixed_batch = dims[0].dim_value if dims and dims[0].HasField("dim_value") else 0
        # A fixed input size, when the graph has one, is the default preprocessing size.
        self.input_hw: tuple[int, int] | None = (
            (dims[2].dim_value, dims[3].dim_value)
            if len(dims) == 4 and all(d.HasField("dim_value") and d.dim_value > 0 for d in dims[2:])
            else None)
        self.convs: dict[str, OnnxConv] = {}
        for i, node in enumerate(graph.node):
            if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in constants:
                continue
            bias = constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            conv = OnnxConv(node, constants[node.input[1]].astype(np.float32),
                            None if bias is None else bias.astype(np.float32))
            self._attach(_layer_name(node, node.input[1], i), conv)
        # Conv outputs become graph outputs, fetched only when a hook wants them.
        elem = next(i for i in graph.input if i.name == self.input_name).type.tensor_type.elem_type
        existing = {o.name for o in graph.output}
        for conv in self.convs.values():
            if conv.output_name not in existing:
                graph.output.append(onnx.helper.make_tensor_value_info(conv.output_name, elem, None))
        self._model_bytes = model.SerializeToString()
        self._session: Any = None

    def _attach(self, name: str, conv: OnnxConv) -> None:
        """Register under a dotted name, with plain containers for the prefixes (get_submodule works)."""
        if name in self.convs:
            name = f"{name}_{len(self.convs)}"
        parent: nn.Module = self
        *prefix, leaf = name.split(".")
        try:
            for part in prefix:
                child = parent._modules.get(part)
                if child is None:
                    child = nn.Module()
                    parent.add_module(part, child)
                elif isinstance(child, OnnxConv):
                    raise KeyError(part)
                parent = child
            if leaf in parent._modules or hasattr(parent, leaf) and leaf not in parent._modules:
                raise KeyError(leaf)
            parent.add_module(leaf, conv)
        except (KeyError, TypeError):
            name = name.replace(".", "_")
            self.add_module(name, conv)
        self.convs[name] = conv

    def _ensure_session(self) -> Any:
        if self._session is None:
            try:
                import onnxruntime as ort
            except ImportError:  # the server extra leaves the runtime to the cpu / gpu extra (pyproject.toml)
                raise ImportError("ONNX models need onnxruntime: pip install 'convlens[cpu]' (or 'convlens[gpu]' "
                                  "on a CUDA machine)") from None

            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                         if p in ort.get_available_providers()]
            self._session = ort.InferenceSession(self._model_bytes, providers=providers)
        return self._session

    def __getstate__(self) -> dict[str, Any]:
        # deepcopy (ServedModel.replica) and pickling: an InferenceSession is rebuilt, not copied.
        state = self.__dict__.copy()
        state["_session"] = None
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            raise forward_only("onnx", "this call")
        hooked = [c for c in self.convs.values() if c._forward_hooks or c._forward_pre_hooks]
        wanted = [self.output_name] + [c.output_name for c in hooked]
        batch = x.detach().to("cpu", torch.float32).numpy()
        session = self._ensure_session()
        if self.fixed_batch == 1 and batch.shape[0] != 1:
            runs = [session.run(wanted, {self.input_name: batch[i:i + 1]}) for i in range(batch.shape[0])]
            results = [np.concatenate([r[k] for r in runs]) for k in range(len(wanted))]
        else:
            results = session.run(wanted, {self.input_name: batch})
        for conv, value in zip(hooked, results[1:], strict=True):
            conv._captured = torch.from_numpy(value).to(x.device)
            try:
                conv()  # fires the hooks with the output onnxruntime computed
            finally:
                conv._captured = None
        return torch.from_numpy(results[0]).to(x.device)
