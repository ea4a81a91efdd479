"""The step runner: one optimisation step for a batch of jobs that share a key (see job.py).

Stack the jobs' inputs, capture the layers they read (hooks removed in `finally`), sum the per-job
losses, one backward (torch.autograd.grad: the model's parameters get no .grad), then each job updates its
own state: Adam jobs together on stacked tensors, others one by one. A job's input may hold several images
(rows); `loss(acts, row)` gets the first of its rows. The model runs in eval mode, so no
sample's output depends on another's and each job's gradient is exactly what it would be alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from convlens.server.engine.hooks import capture_outputs, eval_mode
from convlens.server.engine.optimize.job import Job, StepLoss, StepReport
from convlens.server.engine.optimize.objectives import Activations
from convlens.server.engine.optimize.optimizers import LBFGS, Adam


def run_step(module: nn.Module, jobs: Sequence[Job]) -> list[StepReport]:
    """One step for every job (all with equal keys); returns each job's report, in order."""
    if not jobs:
        return []
    if any(job.optimizer.needs_closure for job in jobs):
        if len(jobs) != 1:
            raise ValueError("a job whose optimiser needs a closure (L-BFGS) must run alone")
        return [_closure_step(module, jobs[0])]
    layers = frozenset().union(*(job.layers for job in jobs))
    with eval_mode(module), torch.enable_grad():
        inputs = [job.make_input() for job in jobs]
        shapes = {tuple(x.shape[1:]) for x in inputs}
        if len(shapes) != 1:
            raise ValueError(f"jobs of one batch made inputs of different shapes {sorted(shapes)}; "
                             "their keys must pin the input shape")
        losses, grads = _forward_backward(module, jobs, torch.cat(inputs), layers, [len(x) for x in inputs])
    adams = {i: opt for i, job in enumerate(jobs) if isinstance(opt := job.optimizer, Adam)}
    Adam.step_many(list(adams.values()), [jobs[i].params for i in adams], [grads[i] for i in adams])
    for i, job in enumerate(jobs):
        if i not in adams:
            job.optimizer.step(job.params, grads[i])
    return [job.after_step(grads[i], losses[i]) for i, job in enumerate(jobs)]


def _forward_backward(module: nn.Module, jobs: Sequence[Job], batch: torch.Tensor, layers: frozenset[str],
                      rows: Sequence[int]) -> tuple[list[StepLoss], list[list[torch.Tensor]]]:
    with capture_outputs(module, sorted(layers)) as captured:
        logits = module(batch)
    acts = Activations(logits, dict(captured.outputs))
    firsts = [sum(rows[:i]) for i in range(len(jobs))]
    losses = [job.loss(acts, first) for first, job in zip(firsts, jobs, strict=True)]
    params = [p for job in jobs for p in job.params]
    raw = torch.autograd.grad(torch.stack([loss.total for loss in losses]).sum(), params, allow_unused=True)
    flat = [torch.zeros_like(p) if g is None else g for p, g in zip(params, raw, strict=True)]
    grads, start = [], 0
    for job in jobs:
        grads.append(flat[start:start + len(job.params)])
        start += len(job.params)
    for loss in losses:  # free the graph now; keep only the numbers
        loss.total = loss.total.detach()
        loss.terms = {k: v.detach() for k, v in loss.terms.items()}
    return losses, grads


def _closure_step(module: nn.Module, job: Job) -> StepReport:
    lbfgs = job.optimizer
    if not isinstance(lbfgs, LBFGS):
        raise TypeError(f"only L-BFGS steps with a closure, not {type(lbfgs).__name__}")
    optimizer = lbfgs.torch_optimizer(job.params)
    first: list[tuple[StepLoss, list[torch.Tensor]]] = []

    def closure() -> torch.Tensor:
        with eval_mode(module), torch.enable_grad():
            x = job.make_input()
            losses, grads = _forward_backward(module, [job], x, job.layers, [len(x)])
        for p, g in zip(job.params, grads[0], strict=True):
            p.grad = g.contiguous()  # torch's L-BFGS flattens with .view(-1): a channels_last model's grads fail
        if not first:
            first.append((losses[0], grads[0]))
        total: torch.Tensor = losses[0].total
        return total

    optimizer.step(closure)
    lbfgs.steps += 1
    for p in job.params:
        p.grad = None
    loss, grads = first[0]
    return job.after_step(grads, loss)
