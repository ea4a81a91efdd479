"""Scheduler: turns many small requests into few batches, one worker per device (see docs/architecture.md)."""

from convlens.server.scheduler.devices import parse_devices
from convlens.server.scheduler.policy import BatchPolicy
from convlens.server.scheduler.scheduler import Scheduler
from convlens.server.scheduler.task import Task

__all__ = ["BatchPolicy", "Scheduler", "Task", "parse_devices"]
