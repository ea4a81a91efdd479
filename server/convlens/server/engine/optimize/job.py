"""The Job interface: what an optimisation (MaximizeUnit, Dream, StyleTransfer) gives the step runner.

A job owns its state on one device — parameters, optimiser state, a `torch.Generator` for its random
transforms — and is stepped by `runner.run_step(module, jobs)` together with every other live job of the
same `key`. The contract, so that a job's result never depends on its companions:

- `key`: hashable; jobs with equal keys share one forward/backward, so it must pin down everything that
  batch needs in common: the input shape (H, W) that `make_input` returns and `layers` (the model is
  added by the scheduler). Not the target: different classes and units share a batch. A job whose
  optimiser `needs_closure` (L-BFGS) must have a key no other job has.
- `layers`: the layer names (named_modules) whose outputs `loss` reads; the runner captures exactly the
  union of its batch's layers, with hooks removed in `finally`.
- `params`: the leaf tensors the optimiser updates (gradients are taken with torch.autograd.grad, so the
  model's own parameters never accumulate .grad).
- `optimizer`: an `optimizers.Optimizer`; `Adam` jobs of one batch are updated together, stacked.
- `make_input()`: this step's model input, [1, 3, H, W], already normalised for the model, a
  differentiable function of `params`; draw any randomness from the job's own generator.
- `loss(acts, row)`: a `StepLoss` — the scalar to MINIMISE for this job's `row` of the batch, plus named
  terms for progress events. The runner sums the jobs' losses (a sum, not a mean: each job's gradient
  is its own) and backpropagates once.
- `after_step(grads, loss)`: called after the optimiser step with this job's gradients (regularisers,
  projection, step count); returns the `StepReport` sent as a progress event. `done` is True after the
  last step.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from convlens.server.engine.optimize.objectives import Activations
from convlens.server.engine.optimize.optimizers import Optimizer


@dataclass
class StepLoss:
    total: torch.Tensor  # scalar to minimise
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # named values, for progress


@dataclass(frozen=True)
class StepReport:
    step: int  # steps done, 1-based
    total_steps: int
    terms: dict[str, float]  # objective terms at this step (before the update)
    done: bool
    octave: int | None = None  # Dream: the octave the step ran in (0-based, smallest first)


class Job(Protocol):
    key: Hashable
    layers: frozenset[str]
    params: list[torch.Tensor]
    optimizer: Optimizer

    @property
    def done(self) -> bool: ...

    def make_input(self) -> torch.Tensor: ...

    def loss(self, acts: Activations, row: int) -> StepLoss: ...

    def after_step(self, grads: list[torch.Tensor], loss: StepLoss) -> StepReport: ...
