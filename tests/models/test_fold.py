"""`--fold-batchnorm`: batch norm carried by the convolution before it, for requests that read no layer.

Checked against the unfolded module (the function must be the same up to rounding), on the pairs torch.fx
finds, on modules it must leave alone, and on the real Lite0 (the figures docs/performance.md quotes)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convlens.server.compute.saliency import SaliencyPayload, compute_saliency
from convlens.server.config import from_args
from convlens.server.engine.saliency import SaliencyOptions
from convlens.server.engine.targets import ClassTarget, UnitTarget
from convlens.server.metrics import Metrics
from convlens.server.models.fold import fold_batchnorm, foldable_pairs
from convlens.server.models.model import ServedModel
from convlens.server.scheduler import BatchPolicy, Scheduler, Task
from tests.engine.conftest import LiteNet, randomise_batchnorm, seeded
from tests.scheduler.test_layout import images, served

CPU = torch.device("cpu")


def lite_net() -> nn.Module:
    return randomise_batchnorm(seeded(LiteNet(), 3)).eval()


def test_every_conv_bn_pair_folds_and_the_logits_stay() -> None:
    net = lite_net()
    bns = [name for name, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)]
    x = images(4)
    done = fold_batchnorm(net, x[:1])
    assert done is not None
    folded, replaced = done
    assert sorted(replaced) == sorted(bns) and len(bns) >= 4
    assert all(isinstance(dict(folded.named_modules())[n], nn.Identity) for n in bns)
    assert [n for n, _ in folded.named_modules()] == [n for n, _ in net.named_modules()]  # names stay
    assert all(isinstance(m, nn.BatchNorm2d) for n, m in net.named_modules() if n in bns), "original untouched"
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), rtol=1e-5, atol=1e-5)


class SharedConvOutput(nn.Module):
    """The conv's output is read twice (by the BN and by a skip): folding it would change the skip."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        z = F.relu(self.bn(y)) + y
        z = F.relu(self.bn2(self.conv2(z)))
        return self.fc(z.mean(dim=(2, 3)))


class CalledTwice(nn.Module):
    """One conv + BN applied twice: folding the first call's pair would change the second call's input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow is fine: the pairs come from one real forward pass
            x = -x
        return self.bn(self.conv(F.relu(self.bn(self.conv(x))))).mean(dim=(2, 3))


def test_a_conv_output_read_twice_or_a_module_called_twice_is_not_folded() -> None:
    net = randomise_batchnorm(SharedConvOutput()).eval()
    assert foldable_pairs(net, images(1)) == [("conv2", "bn2")]
    done = fold_batchnorm(net, images(1))
    assert done is not None and done[1] == ["bn2"]
    with torch.no_grad():
        torch.testing.assert_close(done[0](images(2)), net(images(2)), rtol=1e-5, atol=1e-5)
    assert foldable_pairs(randomise_batchnorm(CalledTwice()).eval(), images(1)) == []
    assert fold_batchnorm(randomise_batchnorm(CalledTwice()).eval(), images(1)) is None
    assert fold_batchnorm(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()).eval(), images(1)) is None


def test_folding_while_another_thread_computes_leaves_that_thread_alone() -> None:
    """The copy is analysed with hooks of its own, nothing process-wide: a forward on another thread at the
    same moment is untouched (torch.fx's tracer, used at first, patched every module's __call__)."""
    import threading

    net, other = lite_net(), lite_net()
    x = images(2)
    with torch.no_grad():
        want = other(x)
    stop, errors, outputs = threading.Event(), [], []

    def compute() -> None:
        try:
            while not stop.is_set():
                with torch.no_grad():
                    outputs.append(other(x))
        except Exception as exc:  # what the fx tracer did to the other thread
            errors.append(exc)

    t = threading.Thread(target=compute)
    t.start()
    try:
        for _ in range(5):
            assert fold_batchnorm(net, x[:1]) is not None
    finally:
        stop.set()
        t.join()
    assert not errors and outputs
    assert all(torch.equal(o, want) for o in outputs)


def test_saliency_uses_the_folded_copy_only_when_no_layer_is_read() -> None:
    model = replace(served(lite_net()), fold_batchnorm=True)
    plain = served(lite_net())
    x = images(3)
    unit = [SaliencyPayload(SaliencyOptions(), x[i], UnitTarget("_blocks.0", 1, y=3, x=3)) for i in range(3)]
    got = compute_saliency(model, unit)
    assert "folded" not in model.__dict__, "a unit target reads a layer: the folded copy is not even built"
    for a, b in zip(got, compute_saliency(plain, unit), strict=True):
        assert torch.equal(a.attribution, b.attribution)
    classes = [SaliencyPayload(SaliencyOptions(method=m), x[i], ClassTarget(i))
               for i, m in enumerate(["gradient", "guided_backprop", "integrated_gradients"])]
    for payload in classes:
        (a,) = compute_saliency(model, [payload])
        (b,) = compute_saliency(plain, [payload])
        assert a.target == b.target
        scale = float(b.attribution.abs().max())
        torch.testing.assert_close(a.attribution, b.attribution, rtol=1e-4, atol=1e-4 * scale)
        torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)
    assert model.__dict__.get("folded") is not None
    assert served(lite_net()).folded is None, "off unless asked for"


async def test_the_scheduler_hands_out_fold_enabled_replicas_when_asked() -> None:
    seen: list[bool] = []

    def compute(replica: ServedModel, payloads: Any) -> list[Any]:
        seen.append(replica.fold_batchnorm and replica.folded is not None)
        return list(payloads)

    for fold in (False, True):
        model = served(lite_net())  # (a model keeps its replicas: one per server)
        scheduler = Scheduler(lambda name, m=model: m, [CPU], Metrics(), policies={"cpu": BatchPolicy(1, 0.0, 2)},
                              fold_batchnorm=fold)
        await scheduler.start()
        try:
            await asyncio.gather(*(scheduler.submit(Task(model="tiny", rpc="Saliency", key="k", payload=i,
                                                         compute=compute)) for i in range(2)))
        finally:
            await scheduler.stop(2.0)
    assert seen == [False, False, True, True]
    assert not model.fold_batchnorm and "folded" not in model.__dict__, "the repository's model is untouched"
    assert from_args(["--fold-batchnorm"]).fold_batchnorm and not from_args([]).fold_batchnorm


@pytest.mark.slow
def test_lite0_folded_gradients_differ_only_at_rare_relu6_kinks() -> None:
    """The figures the docs quote: logits to ~1e-5; input gradients equal but for a few entries (measured on
    chelsea and coffee: 0.54% and 0.13% of entries over 1e-4 of the map's max, none over 1.1e-3)."""
    import skimage.data

    from convlens.server.models.embedded import load_lite
    from convlens.server.models.preprocess import prepare

    lite = load_lite("efficientnet_lite0").replica(CPU, memory_format=torch.channels_last, fresh=True)
    folded = replace(lite, fold_batchnorm=True).folded
    assert folded is not None
    bns = [n for n, m in lite.module.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 49 and all(isinstance(dict(folded.module.named_modules())[n], nn.Identity) for n in bns)
    x = torch.stack([prepare(skimage.data.chelsea(), lite.preprocess)[0],
                     prepare(skimage.data.coffee(), lite.preprocess)[0]])
    payloads = [SaliencyPayload(SaliencyOptions(), x[i], None) for i in range(2)]
    for a, b in zip(compute_saliency(folded, payloads), compute_saliency(lite, payloads), strict=True):
        assert a.target == b.target and a.target_value == pytest.approx(b.target_value, abs=1e-4)
        diff = (a.attribution - b.attribution).abs() / b.attribution.abs().max()
        assert float(diff.mean()) < 1e-4 and float((diff > 1e-3).float().mean()) < 5e-3
        assert float(diff.max()) < 5e-2
