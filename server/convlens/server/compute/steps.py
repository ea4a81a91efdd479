"""Optimisation steps as a batch computation: one step of every job in the batch (MaximizeUnit, Dream,
StyleTransfer; the scheduler's step groups in scheduler/steps.py submit it)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from convlens.server.engine.optimize.job import Job
from convlens.server.engine.optimize.runner import run_step
from convlens.server.errors import ResourceExhausted
from convlens.server.models.model import ServedModel


def compute_steps(model: ServedModel, jobs: Sequence[Job]) -> list[Any]:
    """One step for a batch of jobs; each result is (StepReport, batch size) or that job's error.

    A failure in the batched forward/backward happens before any job's state changed, so the jobs are then
    retried one by one: a job whose objective fails does not take its companions down with it.
    """
    if not any(job.layers for job in jobs):  # class-logit objectives: --fold-batchnorm may apply
        model = model.folded or model
    try:
        return [(r, len(jobs)) for r in run_step(model.module, jobs)]
    except Exception:
        if len(jobs) == 1:
            raise
    results: list[Any] = []
    for job in jobs:
        try:
            results.append((run_step(model.module, [job])[0], 1))
        except torch.OutOfMemoryError:  # this job alone does not fit (#15): retryable, not INTERNAL
            results.append(ResourceExhausted("out of memory computing this job's step alone; retry with a "
                                             "smaller size, or on another instance"))
        except Exception as exc:
            results.append(exc)
    return results
