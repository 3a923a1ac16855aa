"""Embedding on Dask: the core's `b3mine.teacher` job with its shards spread over the workers.

The job is planned in the caller (texts read, teacher hashed, finished shards found: nothing is
loaded); each missing shard becomes one task that ships only that shard's texts. A worker loads
the teacher once (cached per worker process) and writes the shard with the core's
`b3mine.teacher.encode_shard`, into the shard directory beside the output, so the directory
must be shared with the workers (always true for a LocalCluster). The caller assembles the file.
Resume, fingerprints and the output are the local ones: the same texts give the same file
either way, and a run killed half-way resumes on either engine.

>>> from pipelines.embed import embed                                   # doctest: +SKIP
>>> embed("pairs.parquet", "pairs.emb.parquet", workers=2).encoded       # doctest: +SKIP
12
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from distributed import Client, as_completed

from b3mine.progress import ProgressCallback
from b3mine.teacher import EmbedJob, EmbedOptions, EmbedResult, Shard, encode_shard, load_teacher
from b3mine.teacher import embed as core_embed
from b3mine.texts import TextPairs, TextSource

from pipelines.cluster import connect

#: Per worker process: how many times each teacher was loaded (read by tests via client.run).
LOADS: dict[str, int] = {}


@functools.lru_cache(maxsize=1)
def worker_teacher(model_dir: str, device: str, precision: str, max_seq_length: int | None):
    """The teacher of this worker process: loaded on the first shard, reused by the next."""
    LOADS[model_dir] = LOADS.get(model_dir, 0) + 1
    return load_teacher(model_dir, device=device, precision=precision,
                        max_seq_length=max_seq_length)


def embed_shard_task(model_dir: str, precision: str, options: EmbedOptions, shard_dir: str,
                     key: str, queries: list[str], targets: list[str] | None) -> str:
    # ``precision`` as the caller resolved it: it is part of the shard keys
    model = worker_teacher(model_dir, options.device, precision, options.max_seq_length)
    return encode_shard(model, shard_dir, key, queries, targets, options)


def worker_loads() -> dict[str, int]:
    return dict(LOADS)


def embed(
    texts: TextSource | TextPairs | str | Path,
    out: str | Path,
    *,
    client: Client | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
    threads_per_worker: int | None = 1,
    **options: Any,
) -> EmbedResult:
    """`b3mine.teacher.embed` (same ``options``) with one Dask task per missing shard (module
    doc); the cluster is chosen as `pipelines.cluster.connect` does."""

    def run_shards(job: EmbedJob, todo: list[Shard], progress: ProgressCallback | None) -> None:
        with connect(client=client, scheduler=scheduler, workers=workers,
                     threads_per_worker=threads_per_worker) as dask:
            futures = [dask.submit(embed_shard_task, str(job.model_dir), job.precision,
                                   job.options, str(job.shard_dir), s.key, *job.texts_of(s),
                                   pure=False)
                       for s in todo]
            try:
                for done, fut in enumerate(as_completed(futures), 1):
                    fut.result()
                    if progress is not None:
                        progress("embed", done / len(futures))
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise

    return core_embed(texts, out, run_shards=run_shards, **options)
