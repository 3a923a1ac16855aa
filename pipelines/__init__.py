"""Mining at scale on Dask: the same stages and the same plan as ``b3mine.mining.mine``.

Examples (they need a corpus and a cluster, so doctest skips them)::

    from pipelines import mine
    plan = mine("corpus.parquet", MiningConfig(), "plans", workers=2)      # a LocalCluster
    plan = mine("corpus.parquet", MiningConfig(), "plans", scheduler="tcp://host:8786")
"""
from __future__ import annotations

from pipelines.checkpoints import read_progress
from pipelines.engine import JobResult, StageError, job_id_for, mine, run_job

__all__ = ["JobResult", "StageError", "job_id_for", "mine", "read_progress", "run_job"]
