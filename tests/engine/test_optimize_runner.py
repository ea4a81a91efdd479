"""The step runner: a job's result does not depend on its batch companions, jobs join and leave between
steps, the objective rises, no hook outlives a step (after success or an exception)."""

from __future__ import annotations

import pytest
import torch

from convlens.server.engine.hooks import leftover_hooks
from convlens.server.engine.optimize.job import StepLoss, StepReport
from convlens.server.engine.optimize.maximize import MaximizeJob, MaximizeSettings, evaluate
from convlens.server.engine.optimize.objectives import (
    Activations,
    ChannelMax,
    ChannelMean,
    ClassLogit,
    UnitActivation,
)
from convlens.server.engine.optimize.optimizers import LBFGS
from convlens.server.engine.optimize.runner import run_step
from tests.engine.conftest import LiteNet, seeded

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
CPU = torch.device("cpu")


def job(preset: str, objective, seed: int, steps: int = 4, size: int = 24, **kw) -> MaximizeJob:
    settings = MaximizeSettings.resolve(preset, steps=steps, size=size, seed=seed, pad=2, jitter=2,
                                        final_jitter=1, **kw)
    return MaximizeJob(settings, objective, mean=MEAN, std=STD, device=CPU)


def run(module, jobs) -> None:
    while not all(j.done for j in jobs):
        run_step(module, [j for j in jobs if not j.done])


@pytest.mark.parametrize("preset", ["lucid", "lecture", "maco"])
def test_seeded_job_same_alone_and_batched_with_seven_others(lite_net, preset):
    alone = job(preset, ClassLogit(1), seed=11)
    run(lite_net, [alone])
    again = job(preset, ClassLogit(1), seed=11)
    # Seven companions with other targets (classes, units, channels) and other seeds, same key.
    others = [job(preset, ClassLogit(c % 5), seed=100 + c) for c in range(4)]
    others += [job(preset, ClassLogit(3), seed=7, learning_rate=0.2),
               job(preset, ClassLogit(0), seed=8), job(preset, ClassLogit(2), seed=9)]
    batch = [others[0], others[1], others[2], again, *others[3:]]
    assert len(batch) == 8 and len({j.key for j in batch}) == 1
    run(lite_net, batch)
    torch.testing.assert_close(again.image(), alone.image(), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(others[0].image(), alone.image())


def test_different_targets_and_layers_keys(lite_net):
    a = job("lucid", ClassLogit(1), seed=1)
    b = job("lucid", ClassLogit(4), seed=2)
    c = job("lucid", ChannelMean("_blocks.0", 3), seed=3)
    d = job("lucid", UnitActivation("_blocks.0", 3, 2, 2), seed=3)
    assert a.key == b.key  # the target itself is not part of the key
    assert c.key == d.key != a.key  # the layers read are
    assert job("lucid", ClassLogit(1), seed=1, size=32).key != a.key


def test_jobs_join_and_leave_mid_run(lite_net):
    solo = {name: job("lucid", ClassLogit(i), seed=i, steps=6) for i, name in enumerate("abc")}
    for j in solo.values():
        run(lite_net, [j])
    live = {name: job("lucid", ClassLogit(i), seed=i, steps=6) for i, name in enumerate("abc")}
    a, b, c = live["a"], live["b"], live["c"]
    run_step(lite_net, [a])
    run_step(lite_net, [a])
    run_step(lite_net, [a, b])  # b joins
    run_step(lite_net, [b, a, c])  # c joins, order changes
    run_step(lite_net, [a, c, b])
    run_step(lite_net, [c, a, b])  # a's 6th and last step: it leaves
    assert a.done and not b.done
    run(lite_net, [b, c])
    for name in "abc":
        torch.testing.assert_close(live[name].image(), solo[name].image(), rtol=1e-4, atol=1e-5)


def test_objective_rises(lite_net):
    j = job("lucid", ChannelMax("_blocks.1", 2), seed=0, steps=30, size=32)
    before = evaluate(lite_net, [j])[0].objective
    reports = [run_step(lite_net, [j])[0] for _ in range(30)]
    after = evaluate(lite_net, [j])[0].objective
    assert reports[-1].done and reports[-1].step == 30 and reports[0].total_steps == 30
    assert set(reports[0].terms) == {"objective"}  # a one-part objective is reported once (the contract)
    assert after > before + 1.0 and after > 1.5 * abs(before)


@pytest.mark.parametrize("preset", ["lucid", "lecture", "maco"])
def test_each_class_logit_rises_on_its_own_image(preset):
    lite_net = seeded(LiteNet())  # smooth enough for 40 steps (randomised BatchNorm saturates the ReLU6s)
    jobs = [job(preset, ClassLogit(c), seed=c, steps=40, size=32) for c in range(5)]
    before = [e.logits[c] for c, e in enumerate(evaluate(lite_net, jobs))]
    run(lite_net, jobs)
    after = [e.logits[c] for c, e in enumerate(evaluate(lite_net, jobs))]
    assert all(a > b + 0.05 for a, b in zip(after, before, strict=True)), (before, after)


def test_sum_not_mean_each_job_gets_its_own_gradient_scale(lite_net):
    """A mean over the batch would scale every gradient by 1/N; compare the first step's gradient."""
    grads = {}

    class Spy(MaximizeJob):
        def after_step(self, g, loss):  # type: ignore[override]
            grads.setdefault(len(grads), g[0].clone())
            return super().after_step(g, loss)

    settings = MaximizeSettings.resolve("lucid", steps=1, size=24, seed=5)
    alone = Spy(settings, ClassLogit(1), mean=MEAN, std=STD, device=CPU)
    run_step(lite_net, [alone])
    grads_alone = grads.pop(0)
    batch = [Spy(settings, ClassLogit(1), mean=MEAN, std=STD, device=CPU) for _ in range(4)]
    run_step(lite_net, batch)
    for g in grads.values():
        torch.testing.assert_close(g, grads_alone, rtol=1e-4, atol=1e-7)


def test_model_parameters_get_no_grad(lite_net):
    run_step(lite_net, [job("lucid", ClassLogit(1), seed=0)])
    assert all(p.grad is None for p in lite_net.parameters())


class Boom(MaximizeJob):
    def loss(self, acts: Activations, row: int) -> StepLoss:
        raise RuntimeError("boom")


def test_no_hook_outlives_a_step_after_success_or_exception(lite_net):
    lite_net.train()
    good = job("lucid", ChannelMean("_blocks.0", 1) + UnitActivation("_blocks.1", 0, 1, 1), seed=0)
    run_step(lite_net, [good])
    assert leftover_hooks(lite_net) == []
    assert all(m.training for m in lite_net.modules())  # eval only for the step
    settings = MaximizeSettings.resolve("lucid", steps=2, size=24, seed=0, pad=2, jitter=2, final_jitter=1)
    bad = Boom(settings, ChannelMean("_blocks.0", 1), mean=MEAN, std=STD, device=CPU)
    with pytest.raises(RuntimeError, match="boom"):
        run_step(lite_net, [good, bad])
    assert leftover_hooks(lite_net) == []
    assert all(m.training for m in lite_net.modules())


def test_mismatched_input_shapes_are_refused(lite_net):
    with pytest.raises(ValueError, match="different shapes"):
        run_step(lite_net, [job("lucid", ClassLogit(1), seed=0), job("lucid", ClassLogit(1), seed=0, size=32)])


class Quadratic:
    """A job with a known minimum: pixels toward a target image, via the model-free identity."""

    def __init__(self, optimizer) -> None:
        self.x = torch.zeros(1, 3, 4, 4, requires_grad=True)
        self.params = [self.x]
        self.optimizer = optimizer
        self.key = ("quadratic", id(self))
        self.layers: frozenset[str] = frozenset()
        self.steps = 0
        self.target = torch.linspace(-1, 1, 48).view(1, 3, 4, 4)

    @property
    def done(self) -> bool:
        return self.steps >= 3

    def make_input(self) -> torch.Tensor:
        return self.x

    def loss(self, acts: Activations, row: int) -> StepLoss:
        value = ((acts.logits[row] - self.target[0].flatten()) ** 2).sum()
        return StepLoss(value, {"loss": value})

    def after_step(self, grads, loss) -> StepReport:
        self.steps += 1
        return StepReport(self.steps, 3, {k: float(v) for k, v in loss.terms.items()}, self.done)


def test_lbfgs_runs_a_lone_job_and_refuses_a_batch():
    flatten = torch.nn.Flatten()
    j = Quadratic(LBFGS(lr=1.0, max_iter=20))
    first = run_step(flatten, [j])[0]
    assert first.terms["loss"] > 1.0
    torch.testing.assert_close(j.x.detach(), j.target, rtol=1e-4, atol=1e-4)  # a quadratic: solved
    with pytest.raises(ValueError, match="alone"):
        run_step(flatten, [j, Quadratic(LBFGS())])
