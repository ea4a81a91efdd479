"""ServedModel.replica copies a module without a warning filter: a TorchScript module's copied parameters are
leaves, as the original's are (no non-leaf `.grad` read when the copy is moved or re-laid out), on any
thread, with grad mode on, under pytest's warnings-as-errors; and the forward-only wording is one."""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from convlens.server.errors import FailedPrecondition
from convlens.server.models.model import Preprocess, ServedModel, copy_module
from convlens.server.models.onnx_module import OnnxModule
from convlens.server.models.torchscript_module import ScriptedModel
from convlens.server.service.context import require_gradients
from tests.models.conftest import make_tiny_cnn

CPU = torch.device("cpu")


def scripted() -> ServedModel:
    with warnings.catch_warnings():  # torch.jit.script is deprecated; served TorchScript files still exist
        warnings.simplefilter("ignore", FutureWarning)
        module = ScriptedModel(torch.jit.script(make_tiny_cnn()))
    return ServedModel(name="ts", format="torchscript", module=module,
                       preprocess=Preprocess(16, 16, 16, (0.5,) * 3, (0.25,) * 3), labels=[f"c{i}" for i in range(5)],
                       supports_gradients=True)


def test_a_torchscript_copy_keeps_leaf_parameters_and_their_flags() -> None:
    model = scripted()
    original = dict(model.module.named_parameters())
    assert original and all(p.is_leaf and p.requires_grad for p in original.values())
    with torch.enable_grad():  # a lane thread's default: the C++ deep copy clones under it
        copied = dict(copy_module(model.module).named_parameters())
    assert copied.keys() == original.keys()
    for name, p in copied.items():
        assert p.is_leaf and p.grad_fn is None, name
        assert p.requires_grad == original[name].requires_grad, name
        assert torch.equal(p, original[name]) and p.data_ptr() != original[name].data_ptr(), name


def test_replicas_made_on_many_threads_at_once_warn_nothing_and_compute_the_same() -> None:
    """The old code hid the warning with warnings.catch_warnings(), which is process-wide state: two lanes
    making replicas at once restored each other's filters. Now there is nothing to hide: pytest's "error"
    filter is on for every thread here, so one warning would fail a replica."""
    model = scripted()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model.module(x)

    def make(i: int) -> torch.Tensor:
        layout = torch.channels_last if i % 2 else torch.contiguous_format
        replica = model.replica(CPU, memory_format=layout, fresh=True)
        assert all(p.is_leaf for p in replica.module.parameters())
        with torch.no_grad():
            return replica.module(x.contiguous(memory_format=layout))

    with ThreadPoolExecutor(4) as pool:
        outputs = list(pool.map(make, range(8)))
    for out in outputs:
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_onnx_refuses_a_gradient_in_the_services_words(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's legacy ONNX exporter warns that it is legacy
        torch.onnx.export(make_tiny_cnn(), (torch.zeros(1, 3, 16, 16),), str(tmp_path / "m.onnx"), dynamo=False)
    module = OnnxModule(tmp_path / "m.onnx")
    with pytest.raises(FailedPrecondition) as inside:
        module(torch.zeros(1, 3, 16, 16, requires_grad=True))
    served = ServedModel(name="m", format="onnx", module=module, preprocess=Preprocess(16, 16, 16, (0.5,) * 3,
                         (0.25,) * 3), labels=[f"c{i}" for i in range(5)], supports_gradients=False)
    with pytest.raises(FailedPrecondition) as before:
        require_gradients(served, "Saliency")
    assert inside.value.reason == before.value.reason == "GRADIENTS_UNSUPPORTED"
    wording = "is served in the onnx format, which runs forward-only here;"
    assert wording in inside.value.message and wording in before.value.message
    assert before.value.message.startswith("model 'm' is served") and "Saliency needs gradients" in before.value.message
