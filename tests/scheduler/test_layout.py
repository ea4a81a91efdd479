"""Workers run replicas in their device's memory layout (channels_last on the CPU), and a replica in that
layout computes what the contiguous model computes: saliency maps, gradients and values are equal within
float tolerance (only the order of floating-point sums may differ)."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

from convlens.server.compute.saliency import SaliencyPayload, compute_saliency
from convlens.server.engine.saliency import SaliencyOptions
from convlens.server.engine.targets import ClassTarget, UnitTarget
from convlens.server.metrics import Metrics
from convlens.server.models.catalog import build_catalog
from convlens.server.models.model import Preprocess, ServedModel
from convlens.server.scheduler import BatchPolicy, Scheduler, Task
from convlens.server.scheduler.policy import memory_format_for
from tests.engine.conftest import LiteNet, ReluNet, randomise_batchnorm, seeded

CPU = torch.device("cpu")
CL = torch.channels_last


def served(module: torch.nn.Module, size: int = 24) -> ServedModel:
    pre = Preprocess(size, size, size, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    return ServedModel(name="tiny", format="torchvision", module=module.eval(), preprocess=pre,
                       labels=[f"c{i}" for i in range(5)], supports_gradients=True,
                       layers=build_catalog(module, pre))


@pytest.fixture(scope="module")
def lite() -> ServedModel:
    return served(randomise_batchnorm(seeded(LiteNet(), 3)))


def images(n: int, size: int = 24) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(7))


def conv_weights(model: ServedModel) -> list[torch.Tensor]:
    return [m.weight for m in model.module.modules() if isinstance(m, torch.nn.Conv2d)]


def test_the_cpu_runs_channels_last() -> None:
    assert memory_format_for(CPU) == CL


def test_a_channels_last_replica_is_a_copy_in_that_layout(lite: ServedModel) -> None:
    replica = lite.replica(CPU, memory_format=CL)
    assert replica is not lite and replica.memory_format == CL
    assert all(w.is_contiguous(memory_format=CL) for w in conv_weights(replica))
    assert any(not w.is_contiguous() for w in conv_weights(replica))  # 1x1 kernels are both layouts at once
    assert all(w.is_contiguous() for w in conv_weights(lite)), "the repository's module must stay as it was"
    assert replica.resolver is not lite.resolver and replica.resolver.model is replica.module
    assert replica.replica(CPU, memory_format=CL) is replica
    assert replica.batch(list(images(2))).is_contiguous(memory_format=CL)
    onnx_like = ServedModel(name="o", format="onnx", module=lite.module, preprocess=lite.preprocess,
                            labels=lite.labels, supports_gradients=False)
    assert onnx_like.replica(CPU, memory_format=CL) is onnx_like  # onnxruntime keeps its own layout


METHODS = [
    SaliencyOptions(method="gradient"),
    SaliencyOptions(method="guided_backprop"),
    SaliencyOptions(method="deconvnet"),
    SaliencyOptions(method="grad_cam"),
    SaliencyOptions(method="guided_grad_cam", cam_layer="_blocks.0"),
    SaliencyOptions(method="integrated_gradients", ig_steps=6, ig_baseline="blurred", ig_blur_sigma=2.0),
    SaliencyOptions(method="smoothgrad", smooth_samples=3, smooth_base="guided_backprop"),
]


@pytest.mark.parametrize("options", METHODS, ids=lambda o: o.method)
def test_channels_last_equals_contiguous_on_the_saliency_path(lite: ServedModel, options: SaliencyOptions
                                                                ) -> None:
    replica = lite.replica(CPU, memory_format=CL)
    targets = [None, ClassTarget(2), UnitTarget("_blocks.1._depthwise_conv", 5, y=6, x=6),
               UnitTarget("_blocks.0", 1, reduction="max")]
    if options.method in ("grad_cam", "guided_grad_cam"):  # one batch key per unit layer, as the service
        targets = targets[:2]
    payloads = [SaliencyPayload(options, image, target) for image, target in zip(images(len(targets)), targets,
                                                                                 strict=False)]
    plain = compute_saliency(lite, payloads)
    fast = compute_saliency(replica, payloads)
    live = [float(a.attribution.abs().max()) for a in plain]
    assert sum(m > 0 for m in live) >= 2, "all-zero maps would make the comparison vacuous"
    scale = max(live)
    for a, b in zip(plain, fast, strict=True):
        assert b.attribution.is_contiguous()  # whatever the layout, results leave as plain tensors
        torch.testing.assert_close(b.attribution, a.attribution, rtol=1e-4, atol=1e-5 * scale)
        torch.testing.assert_close(b.heatmap, a.heatmap, rtol=1e-4, atol=1e-5 * scale)
        torch.testing.assert_close(b.logits, a.logits, rtol=1e-4, atol=1e-5)
        assert b.target == a.target
        assert b.target_value == pytest.approx(a.target_value, rel=1e-4, abs=1e-5)
        assert b.modified_activations == a.modified_activations


def test_relu_net_gradients_equal_in_both_layouts() -> None:
    """A second architecture (plain convs, ReLU modules, a linear head), the input gradient itself."""
    model = served(seeded(ReluNet(), 5))
    payloads = [SaliencyPayload(SaliencyOptions(), image, None) for image in images(3)]
    plain = compute_saliency(model, payloads)
    fast = compute_saliency(model.replica(CPU, memory_format=CL), payloads)
    for a, b in zip(plain, fast, strict=True):
        torch.testing.assert_close(b.attribution, a.attribution, rtol=1e-4,
                                   atol=1e-5 * float(a.attribution.abs().max()))


def test_torchscript_gradients_equal_in_both_layouts() -> None:
    from convlens.server.models.torchscript_module import ScriptedModel
    from tests.models.conftest import TinyCNN

    torch.manual_seed(0)
    with warnings.catch_warnings():  # torch.jit.script is deprecated; served TorchScript files still exist
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(TinyCNN().eval())
    model = served(ScriptedModel(scripted))
    replica = model.replica(CPU, memory_format=CL)
    assert conv_weights(replica) == [] or all(w.is_contiguous(memory_format=CL) for w in conv_weights(replica))
    assert replica.module.get_submodule("conv1").weight.is_contiguous(memory_format=CL)
    payloads = [SaliencyPayload(SaliencyOptions(method="guided_backprop"), image, None) for image in images(2)]
    for a, b in zip(compute_saliency(model, payloads), compute_saliency(replica, payloads), strict=True):
        torch.testing.assert_close(b.attribution, a.attribution, rtol=1e-4,
                                   atol=1e-5 * float(a.attribution.abs().max()))


async def test_the_worker_computes_on_a_replica_in_its_device_layout(lite: ServedModel) -> None:
    seen: list[Any] = []

    def compute(replica: ServedModel, payloads: Any) -> list[Any]:
        seen.append((replica.memory_format, [w.is_contiguous(memory_format=CL) for w in conv_weights(replica)]))
        return compute_saliency(replica, payloads)

    scheduler = Scheduler(lambda name: lite, [CPU], Metrics(), policies={"cpu": BatchPolicy(4, 0.001)},
                          max_queue=8)
    await scheduler.start()
    try:
        payload = SaliencyPayload(SaliencyOptions(), images(1)[0], ClassTarget(1))
        result = await scheduler.submit(Task(model="tiny", rpc="Saliency", key=payload.batch_key,
                                             payload=payload, compute=compute))
    finally:
        await scheduler.stop(2.0)
    layout, channels_last = seen[0]
    assert layout == CL and all(channels_last)
    (expected,) = compute_saliency(lite, [payload])
    torch.testing.assert_close(result.attribution, expected.attribution, rtol=1e-4,
                               atol=1e-5 * float(expected.attribution.abs().max()))


@pytest.mark.slow
def test_efficientnet_lite0_gradients_equal_in_both_layouts() -> None:
    from convlens.server.models.embedded import load_lite

    model = load_lite("efficientnet_lite0")
    payloads = [SaliencyPayload(SaliencyOptions(), image, target)
                for image, target in zip(images(2, 224), [None, UnitTarget("_blocks.5", 7)], strict=True)]
    plain = compute_saliency(model, payloads)
    fast = compute_saliency(model.replica(CPU, memory_format=CL), payloads)
    for a, b in zip(plain, fast, strict=True):
        assert b.target == a.target
        torch.testing.assert_close(b.attribution, a.attribution, rtol=1e-3,
                                   atol=1e-4 * float(a.attribution.abs().max()))
        torch.testing.assert_close(b.logits, a.logits, rtol=1e-4, atol=1e-4)
