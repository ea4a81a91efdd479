"""Optimisers with per-job state, so jobs can share a batch and still each get their own update.

- `Adam`: one instance per job (its moments and step count). `Adam.step_many` updates several jobs at
  once on stacked tensors with a per-row step count and learning rate; Adam is element-wise, so each row
  gets exactly what its own `torch.optim.Adam` would (tests/engine/optimize/test_optimizers.py).
- `NormalizedGradient`: DeepDream's step, p <- p - step_size * g / mean|g| per job.
- `LBFGS`: torch's L-BFGS, for a job that runs alone (it evaluates the loss several times per step, so
  it cannot share a batch); the step runner gives it a closure. Jobs using it must have a key of their own.

All of them MINIMISE: a job that maximises an objective hands them its negative.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch


class Optimizer:
    needs_closure = False

    def step(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
        raise NotImplementedError

    def settings(self) -> dict[str, float]:
        return {}


class Adam(Optimizer):
    def __init__(self, lr: float = 0.05, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.lr, self.betas, self.eps = lr, betas, eps
        self.steps = 0
        self.exp_avg: list[torch.Tensor] | None = None
        self.exp_avg_sq: list[torch.Tensor] | None = None

    def settings(self) -> dict[str, float]:
        return {"learning_rate": self.lr, "beta1": self.betas[0], "beta2": self.betas[1], "eps": self.eps}

    def step(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
        Adam.step_many([self], [params], [grads])

    def moments(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The first and second moment estimates, one per parameter (after the first step)."""
        if self.exp_avg is None or self.exp_avg_sq is None:
            raise RuntimeError("Adam has no moments before its first step")
        return self.exp_avg, self.exp_avg_sq

    @staticmethod
    @torch.no_grad()
    def step_many(optimizers: Sequence[Adam], params: Sequence[Sequence[torch.Tensor]],
                  grads: Sequence[Sequence[torch.Tensor]]) -> None:
        """One Adam step for each job; parameters of equal shape, dtype, device and betas/eps are stacked."""
        Key = tuple[tuple[int, ...], torch.dtype, torch.device, tuple[float, float], float]
        groups: dict[Key, list[tuple[Adam, torch.Tensor, torch.Tensor, int]]] = defaultdict(list)
        for opt, ps, gs in zip(optimizers, params, grads, strict=True):
            if opt.exp_avg is None or opt.exp_avg_sq is None:
                opt.exp_avg = [torch.zeros_like(p) for p in ps]
                opt.exp_avg_sq = [torch.zeros_like(p) for p in ps]
            opt.steps += 1
            for k, (p, g) in enumerate(zip(ps, gs, strict=True)):
                groups[(tuple(p.shape), p.dtype, p.device, opt.betas, opt.eps)].append((opt, p, g, k))
        for (shape, dtype, device, (beta1, beta2), eps), rows in groups.items():
            assert all(o.exp_avg is not None and o.exp_avg_sq is not None for o, _, _, _ in rows)
            p = torch.stack([r[1] for r in rows])
            g = torch.stack([r[2] for r in rows])
            m = torch.stack([r[0].moments()[0][r[3]] for r in rows])
            v = torch.stack([r[0].moments()[1][r[3]] for r in rows])
            view = (-1,) + (1,) * len(shape)
            t = torch.tensor([float(r[0].steps) for r in rows], dtype=torch.float64)
            lr = torch.tensor([r[0].lr for r in rows], dtype=torch.float64)
            step_size = (lr / (1 - beta1 ** t)).to(device, dtype).view(view)
            bc2_sqrt = torch.sqrt(1 - beta2 ** t).to(device, dtype).view(view)
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            p.sub_(step_size * m / (v.sqrt() / bc2_sqrt).add_(eps))  # torch.optim.Adam's update, per row
            for i, (opt, param, _, k) in enumerate(rows):
                param.copy_(p[i])
                opt.moments()[0][k].copy_(m[i])
                opt.moments()[1][k].copy_(v[i])


class NormalizedGradient(Optimizer):
    """google/deepdream's step: p -= step_size * g / mean(|g|) (per job; mean over all its elements)."""

    def __init__(self, step_size: float) -> None:
        self.step_size = step_size
        self.steps = 0

    def settings(self) -> dict[str, float]:
        return {"step_size": self.step_size}

    @torch.no_grad()
    def step(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
        self.steps += 1
        for p, g in zip(params, grads, strict=True):
            p.sub_(g * (self.step_size / (g.abs().mean() + 1e-8)))


class LBFGS(Optimizer):
    needs_closure = True

    def __init__(self, lr: float = 1.0, max_iter: int = 20, history_size: int = 100,
                 line_search_fn: str | None = None, tolerance_grad: float = 1e-7,
                 tolerance_change: float = 1e-9) -> None:
        self.lr, self.max_iter, self.history_size = lr, max_iter, history_size
        self.line_search_fn = line_search_fn  # None or "strong_wolfe" (torch's)
        # torch's absolute stopping tolerances; a loss whose gradients are tiny in absolute terms (style
        # losses on 0..255 pixels) needs 0, or L-BFGS "converges" before its first move.
        self.tolerance_grad, self.tolerance_change = tolerance_grad, tolerance_change
        self.steps = 0
        self._torch: torch.optim.LBFGS | None = None

    def settings(self) -> dict[str, float]:
        return {"learning_rate": self.lr, "max_iter": float(self.max_iter)}

    def torch_optimizer(self, params: Sequence[torch.Tensor]) -> torch.optim.LBFGS:
        if self._torch is None:
            self._torch = torch.optim.LBFGS(list(params), lr=self.lr, max_iter=self.max_iter,
                                            history_size=self.history_size, line_search_fn=self.line_search_fn,
                                            tolerance_grad=self.tolerance_grad,
                                            tolerance_change=self.tolerance_change)
        return self._torch
