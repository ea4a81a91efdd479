"""Nothing outlives a call: no hook, no torch function mode, no train/eval change, after success and after
an exception raised mid-forward (Captum's test_hook_removal.py, for our engine)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convlens.server.engine.hooks import (
    capture_outputs,
    eval_mode,
    forward_hooks,
    function_mode_active,
    leftover_hooks,
)
from convlens.server.engine.relu_rules import modified_relus
from convlens.server.engine.saliency import METHODS, SaliencyOptions, saliency
from convlens.server.engine.targets import ClassTarget, UnitTarget
from convlens.server.errors import FailedPrecondition, InvalidArgument

pytestmark = pytest.mark.filterwarnings("ignore:Setting backward hooks:UserWarning")


def options_for(method: str) -> SaliencyOptions:
    return SaliencyOptions(method=method, smooth_samples=2, ig_steps=4, cam_layer="_blocks.1")


def assert_clean(model: nn.Module) -> None:
    assert leftover_hooks(model) == []
    assert not function_mode_active()


class Exploding(nn.Module):
    """Raises after its activations ran (so hooks and the ReLU mode are live when it fails)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.armed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        if self.armed:
            raise RuntimeError("boom")
        return out


@pytest.mark.parametrize("method", METHODS)
def test_no_leaks_after_success(lite_net, images, space, method):
    targets = [ClassTarget(1), UnitTarget("_blocks.0._bn0", 2, y=1, x=1), UnitTarget("_blocks.1", 3)]
    lite_net.train()
    saliency(lite_net, images, targets, options_for(method), space)
    assert_clean(lite_net)
    assert all(m.training for m in lite_net.modules())


@pytest.mark.parametrize("method", METHODS)
def test_no_leaks_after_exception_mid_forward(lite_net, images, space, method):
    model = Exploding(lite_net)
    targets = [None, UnitTarget("inner._blocks.0._bn0", 2, y=1, x=1), UnitTarget("inner._blocks.1", 3)]
    options = SaliencyOptions(method=method, smooth_samples=2, ig_steps=4, cam_layer="inner._blocks.1")
    saliency(model, images, targets, options, space)  # the default cam layer gets probed and cached
    model.train()
    model.armed = True
    with pytest.raises(RuntimeError, match="boom"):
        saliency(model, images, targets, options, space)
    assert_clean(model)
    assert all(m.training for m in model.modules())


def test_no_leaks_after_a_bad_target(lite_net, images, space):
    for method in ("guided_backprop", "integrated_gradients", "grad_cam"):
        with pytest.raises(InvalidArgument):
            saliency(lite_net, images, [UnitTarget("_bn1", 99)] * 3, options_for(method), space)
        assert_clean(lite_net)


def test_capture_keeps_the_layer_output_before_an_inplace_activation():
    conv = nn.Conv2d(3, 4, 3)
    model = nn.Sequential(conv, nn.ReLU(inplace=True))
    x = torch.randn(2, 3, 8, 8)
    with capture_outputs(model, ["0"]) as captured:
        out = model(x)
    torch.testing.assert_close(captured.outputs["0"], conv(x))
    assert (captured.outputs["0"] < 0).any() and (out >= 0).all()
    assert leftover_hooks(model) == []


def test_capture_keeps_the_last_call_of_a_shared_module():
    act = nn.ReLU()
    model = nn.Sequential(act, nn.Identity())
    with capture_outputs(model, ["0"]) as captured:
        model(torch.ones(1, 2))
        act(torch.full((1, 2), 3.0))
    assert captured.calls == {"0": 2}
    assert captured.reused() == ["0"]
    torch.testing.assert_close(captured.outputs["0"], torch.full((1, 2), 3.0))


def test_capture_removes_hooks_when_the_block_raises():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(RuntimeError), capture_outputs(model, ["0", "1"]):
        model(torch.randn(1, 5, 8, 8))  # wrong channel count
    assert leftover_hooks(model) == []


def test_eval_mode_restores_each_flag_after_an_exception():
    model = nn.Sequential(nn.BatchNorm1d(2), nn.Dropout(), nn.Linear(2, 2))
    model.train()
    model[1].eval()
    with pytest.raises(ValueError), eval_mode(model):
        assert not any(m.training for m in model.modules())
        raise ValueError
    assert [m.training for m in model.modules()] == [True, True, False, True]


def test_relu_rule_is_scoped():
    x = torch.tensor([-1.0, 2.0, 7.0], requires_grad=True)
    upstream = torch.tensor([1.0, -1.0, 1.0])
    with modified_relus("guided_backprop") as modified:
        y = F.relu6(x)
        z = F.relu(x)
    (guided,) = torch.autograd.grad(y, x, upstream)
    torch.testing.assert_close(guided, torch.tensor([0.0, 0.0, 0.0]))  # -1 < 0; g < 0; 7 > 6
    (guided_relu,) = torch.autograd.grad(z, x, upstream)
    torch.testing.assert_close(guided_relu, torch.tensor([0.0, 0.0, 1.0]))
    assert modified.count == 2 and not function_mode_active()
    (plain,) = torch.autograd.grad(F.relu(x), x, upstream)  # outside: the plain rule again
    torch.testing.assert_close(plain, torch.tensor([0.0, -1.0, 1.0]))
    with pytest.raises(KeyError), modified_relus("deconvnet"):
        raise KeyError
    assert not function_mode_active()


def test_relu_rule_leaves_no_grad_calls_alone():
    with torch.no_grad(), modified_relus("deconvnet") as modified:
        out = F.relu(torch.tensor([-1.0, 1.0]))
    torch.testing.assert_close(out, torch.tensor([0.0, 1.0]))
    assert modified.count == 0


def test_relu_rule_stays_in_its_thread():
    """Workers run on threads: one request's guided mode must not reach another thread's model."""
    import threading

    entered, release = threading.Event(), threading.Event()

    def guided_request() -> None:
        with modified_relus("guided_backprop"):
            entered.set()
            release.wait(timeout=10)

    worker = threading.Thread(target=guided_request)
    worker.start()
    try:
        assert entered.wait(timeout=10)
        assert not function_mode_active()
        x = torch.tensor([1.0, 2.0], requires_grad=True)
        (grad,) = torch.autograd.grad(F.relu(x), x, torch.tensor([-1.0, 1.0]))
        torch.testing.assert_close(grad, torch.tensor([-1.0, 1.0]))  # plain rule here
    finally:
        release.set()
        worker.join()


def test_a_pre_hook_inside_torchscript_is_refused_and_nothing_stays() -> None:
    """Pre-hooks go through the same TorchScript check as forward hooks (FailedPrecondition, not torch's bare
    RuntimeError, which would reach the caller as INTERNAL), and a hook made before the refusal is removed."""
    with warnings.catch_warnings():  # torch.jit.script is deprecated; served TorchScript files still exist
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(nn.Conv2d(3, 4, 3))
    model = nn.Sequential(nn.Conv2d(3, 3, 1), scripted, nn.ReLU())
    for hooks, pre_hooks in (([(model[0], lambda m, i, o: None)], [(scripted, lambda m, a: None)]),
                             ([(scripted, lambda m, i, o: None)], [(model[2], lambda m, a: None)])):
        with pytest.raises(FailedPrecondition, match="inside TorchScript code"), forward_hooks(hooks, pre_hooks):
            pass
        assert not model[0]._forward_hooks and not model[2]._forward_pre_hooks
    with forward_hooks([(model[0], lambda m, i, o: None)], [(model[2], lambda m, a: None)]):
        assert len(model[0]._forward_hooks) == 1 and len(model[2]._forward_pre_hooks) == 1
    assert not model[0]._forward_hooks and not model[2]._forward_pre_hooks
