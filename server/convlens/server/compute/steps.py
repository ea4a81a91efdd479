"""Optimisation steps as a batch computation: one step of every job in the batch (MaximizeUnit, Dream,
StyleTransfer; the scheduler's step groups in scheduler/steps.py submit it)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from convlens.server.engine.optimize.job import Job
from convlens.server.engine.optimize.runner import run_step
from convlens.server.models.model import ServedModel


def compute_steps(model: ServedModel, jobs: Sequence[Job]) -> list[Any]:
    """One step for a batch of jobs; each result is (StepReport, batch size) or that job's error.

    A failure in the batched forward/backward happens before any job's state changed, so the jobs are then
    retried one by one: a job whose objective fails does not take its companions down with it.
    """
    try:
        return [(r, len(jobs)) for r in run_step(model.module, jobs)]
    except Exception:
        if len(jobs) == 1:
            raise
    results: list[Any] = []
    for job in jobs:
        try:
            results.append((run_step(model.module, [job])[0], 1))
        except Exception as exc:
            results.append(exc)
    return results
