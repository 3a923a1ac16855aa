"""What the routers share: settings, the job registry and runner, the plan store, metrics."""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from service.jobs import JobRegistry
from service.metrics import Metrics
from service.plans import PlanStore
from service.runner import JobRunner
from service.settings import Settings


@dataclass
class Context:
    settings: Settings
    registry: JobRegistry
    runner: JobRunner
    store: PlanStore
    metrics: Metrics
    require_write: Callable[..., Awaitable[None]]
    require_read: Callable[..., Awaitable[None]]  # plans
    require_job_read: Callable[..., Awaitable[None]]
