"""Train on mined batch plans: plan sources, the plan batch sampler, collators, integrations.

Names are imported lazily so that ``import trainers`` stays cheap (no torch, no httpx) until a
name that needs them is used.

>>> from trainers import LocalPlan, PlanBatchSampler       # doctest: +SKIP
>>> sampler = PlanBatchSampler(LocalPlan("plans/0123456789abcdef"), dataset=train_ds)  # doctest: +SKIP
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "PlanSource": "trainers.plans",
    "LocalPlan": "trainers.plans",
    "PlanDatasetMismatch": "trainers.plans",
    "PlanExhausted": "trainers.plans",
    "rank_slice": "trainers.plans",
    "open_source": "trainers.sources",
    "PlanClient": "trainers.client",
    "PlanServiceError": "trainers.client",
    "PlanServiceUnavailable": "trainers.client",
    "PlanBatchSampler": "trainers.samplers",
    "PlanStateMismatch": "trainers.samplers",
    "DatasetIndex": "trainers.samplers",
    "HardNegativeCollator": "trainers.collate",
    "HardNegativeBatch": "trainers.collate",
    "split_hard_negatives": "trainers.collate",
    "PlanSTBatchSampler": "trainers.sentence_transformers",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from trainers.client import PlanClient, PlanServiceError, PlanServiceUnavailable
    from trainers.collate import HardNegativeBatch, HardNegativeCollator, split_hard_negatives
    from trainers.plans import (LocalPlan, PlanDatasetMismatch, PlanExhausted, PlanSource,
                                rank_slice)
    from trainers.samplers import DatasetIndex, PlanBatchSampler, PlanStateMismatch
    from trainers.sentence_transformers import PlanSTBatchSampler
    from trainers.sources import open_source


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'trainers' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
