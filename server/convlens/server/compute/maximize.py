"""MaximizeUnit's one-shot batch computation: score the finished images (objective and logits) together.

Its steps are computed like every optimisation job's (compute/steps.py over engine.optimize.runner).
"""

from __future__ import annotations

from collections.abc import Sequence

from convlens.server.engine.optimize.maximize import Evaluation, MaximizeJob, evaluate
from convlens.server.models.model import ServedModel


def compute_evaluation(model: ServedModel, jobs: Sequence[MaximizeJob]) -> list[Evaluation]:
    return evaluate(model.module, jobs)
