"""Mixture plans on Dask: each dataset of a `b3mine.mixture.Mixture` is mined by its own task.

The datasets are independent until their batches are interleaved, so each one's neighbours,
graph, clusters, batches and negatives (`b3mine.mixture.mine_part`, the core's stages) run as
one task, all datasets in parallel; the caller interleaves the parts and writes the plan with
the core's writer, so the plan (and its id) is the in-process one. A dataset given as a file is
read by its task on the worker; in-memory inputs are shipped to it. Per-dataset tasks are not
checkpointed: a failed task is retried, a failed job mines every dataset again.

>>> from pipelines.mixture import mine_mixture                          # doctest: +SKIP
>>> plan = mine_mixture(Mixture.from_file("mix.toml"), config, "plans", workers=3)  # doctest: +SKIP
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from distributed import Client

from b3mine.config import MiningConfig
from b3mine.mixture import Mixture, MixtureDataset, Part
from b3mine.mixture import mine_mixture as core_mine_mixture
from b3mine.plan import BatchPlan

from pipelines.cluster import connect


def mine_mixture(
    mixture: Mixture | Sequence[MixtureDataset],
    config: MiningConfig | None = None,
    out: str | Path = "plans",
    *,
    client: Client | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
    threads_per_worker: int | None = None,
    retries: int = 1,
    **options: Any,
) -> BatchPlan:
    """`b3mine.mixture.mine_mixture` (same ``options``: inputs, progress, report) with one Dask
    task per dataset (module doc)."""
    with connect(client=client, scheduler=scheduler, workers=workers,
                 threads_per_worker=threads_per_worker) as dask:

        def map_parts(fn: Callable[..., Part], args: list[tuple[Any, ...]]) -> list[Part]:
            futures = [dask.submit(fn, *a, pure=False, retries=retries) for a in args]
            return dask.gather(futures)

        return core_mine_mixture(mixture, config, out, map_parts=map_parts, **options)
