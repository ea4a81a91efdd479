"""The optimisation core shared by MaximizeUnit, Dream and StyleTransfer (pure torch; no grpc).

One module per concept (as Lucent, without its leaked hooks and global device):

- param.py — image parameterisations: `PixelParam`, `FourierParam` (Lucid), `MacoParam` (phase only);
  natural_spectrum.py — MACO's magnitude, the average spectrum of the photos our dependencies embed.
- transforms.py — pad / jitter / scale+rotate, drawn from the job's own generator, per sample.
- regularizers.py — L2 decay, blur, zeroing small values / contributions, total variation.
- objectives.py — `Activations` and composable `Objective`s (class logit, unit, channel mean/max, layer
  L2, `Custom`), `+ - *` like Lucent's.
- optimizers.py — per-job `Adam` (stacked across jobs by `Adam.step_many`), `NormalizedGradient`
  (DeepDream), `LBFGS` (a lone job).
- job.py — the `Job` protocol and `StepLoss` / `StepReport`: implement it to plug a technique in.
- runner.py — `run_step(module, jobs)`: one batched forward/backward for jobs sharing a key.
- maximize.py — `MaximizeSettings` (presets lecture / lucid / maco), `MaximizeJob`, `evaluate`.
- dream.py — DeepDream's `DreamJob` (octaves, normalised ascent, guides); style.py — Gatys'
  `StyleJob` (Gram targets, Adam or L-BFGS). Every optimisation job lives here, beside the others.

The scheduler side (convlens.server.scheduler.steps, computing with convlens.server.compute.steps) turns
each step of each job into a task of the batcher; a service only has to build a Job and call
`Scheduler.run_job` (see that module).
"""

from convlens.server.engine.optimize.job import Job, StepLoss, StepReport
from convlens.server.engine.optimize.objectives import Activations, Objective
from convlens.server.engine.optimize.runner import run_step

__all__ = ["Activations", "Job", "Objective", "StepLoss", "StepReport", "run_step"]
