"""The Dask engine: ``b3mine mine --engine dask`` (entry point ``pipelines.engine:mine``).

Same stages, same core functions and same plan id as the in-process ``b3mine.mining.mine``; the
difference is that the work is cut into Dask tasks and every stage leaves a checkpoint:

    load        one task per input shard (Parquet row groups / .npy row ranges), then one task
                for the global id checks and the dataset fingerprint
    neighbours  IVF/HNSW: one task trains/fills the index and saves it; then one task per query
                block (each worker loads the index once); optional corpus shards merged exactly
    graph, clusters, batches, negatives, write   one task each, reading the previous checkpoints

Re-running the same job (same inputs and config -> same job id) skips every stage whose marker
exists, and inside the neighbour stage every block whose part file exists. A worker that dies is
replaced by its nanny and Dask re-runs its tasks elsewhere; outputs are written under temporary
names and renamed, and the plan itself by the core's atomic writer, so a crash can never leave a
partial or mixed plan. A stage that does fail raises ``StageError`` naming it, and leaves the
checkpoints for the next run.

Test hooks (environment of the process that calls ``mine``, documented in docs/pipeline.md):
``B3MINE_PIPELINE_FAIL_STAGE=<stage>`` makes that stage's task raise; ``B3MINE_PIPELINE_TASK_DELAY
=<seconds>`` makes each neighbour block task sleep first.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from distributed import Client, Future, as_completed

from b3mine import storage
from b3mine.config import EmbeddingSource, MiningConfig
from b3mine.embeddings import Embeddings
from b3mine.errors import B3MineError
from b3mine.plan import MANIFEST, BatchPlan, PlanLineage, check_output_dir, plan_id_for
from b3mine.progress import ProgressCallback
from b3mine.writers import LOCK_SUFFIX, remove_orphans, writer_lock

from pipelines import regions, stages
from pipelines.checkpoints import PIPELINE_STAGES, ProgressFile, WorkDir, write_json
from pipelines.cluster import connect

FAIL_ENV = "B3MINE_PIPELINE_FAIL_STAGE"
DELAY_ENV = "B3MINE_PIPELINE_TASK_DELAY"
JOB_VERSION = 1


class StageError(B3MineError):
    """A pipeline stage failed; its checkpoints (and all earlier ones) are kept for resume."""

    def __init__(self, stage: str, job_id: str, work: Path, cause: BaseException) -> None:
        self.stage, self.job_id, self.work, self.cause = stage, job_id, work, cause
        kept = ("nothing to resume: a failed load is removed" if stage == "load" else
                f"checkpoints kept in {work}; run the same job again to resume")
        super().__init__(f"stage {stage!r} failed: {type(cause).__name__}: {cause} "
                         f"(job {job_id}; {kept})")


@dataclass
class JobResult:
    """What a run did: the plan, and for every stage ``ran``, ``skipped`` (checkpoint found) or
    ``cached`` (the plan already existed)."""

    plan: BatchPlan
    job_id: str
    stages: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def _since(start: float) -> float:
    return round(time.perf_counter() - start, 3)


def _as_source(source: EmbeddingSource | str | Path) -> EmbeddingSource:
    if isinstance(source, Embeddings):
        raise TypeError("the Dask engine reads embeddings from files; pass a path or an "
                        "EmbeddingSource (in-memory Embeddings: use b3mine.mining.mine)")
    return source if isinstance(source, EmbeddingSource) else EmbeddingSource(path=str(source))


def _input_files(source: EmbeddingSource) -> list[Path]:
    files: list[Path] = []
    for p in (source.path, source.target_path, source.ids_path):
        if p is None:
            continue
        path = Path(p)
        files += sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    return files


def job_id_for(source: EmbeddingSource | str | Path, config: MiningConfig) -> str:
    """Hash of the config and of the inputs' names, sizes and modification times.

    Cheap (no vector is read), so a re-run finds its work directory before loading anything; a
    rewritten input file gets a new job. The plan id is still the content hash of the data.
    """
    source = _as_source(source)
    h = hashlib.sha256(f"b3mine-dask-job-v{JOB_VERSION}\0".encode())
    h.update(config.canonical_json().encode())
    h.update(source.model_dump_json().encode())
    for f in _input_files(source):
        st = f.stat() if f.exists() else None
        h.update(f"\0{f.resolve()}:{st.st_size if st else -1}:{st.st_mtime_ns if st else -1}"
                 .encode())
    return h.hexdigest()[:20]


def mine(
    source: EmbeddingSource | str | Path,
    config: MiningConfig | None = None,
    out: str | Path = "plans",
    *,
    progress: ProgressCallback | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
    **options: Any,
) -> BatchPlan:
    """Mine a plan on Dask; same signature and result as ``b3mine.mining.mine`` (plus cluster
    options). See ``run_job`` for the options. A `b3mine.mixture.Mixture` is mined one task
    per dataset (``pipelines.mixture``)."""
    from b3mine.mixture import Mixture

    if isinstance(source, Mixture):
        from pipelines.mixture import mine_mixture

        return mine_mixture(source, config, out, progress=progress, scheduler=scheduler,
                            workers=workers, **options)
    return run_job(source, config, out, progress=progress, scheduler=scheduler, workers=workers,
                   **options).plan


def run_job(
    source: EmbeddingSource | str | Path,
    config: MiningConfig | None = None,
    out: str | Path = "plans",
    *,
    progress: ProgressCallback | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
    client: Client | None = None,
    threads_per_worker: int | None = None,
    shard_rows: int = 262_144,
    blocks_per_task: int = 1,
    target_shards: int = 1,
    keep_work: bool = False,
    report: bool = True,
    retries: int = 1,
    lineage: PlanLineage | None = None,
) -> JobResult:
    """Run (or resume) the job and return its plan and what each stage did.

    client / scheduler / workers / threads_per_worker: which cluster (``pipelines.cluster``).
    shard_rows: rows per load task (row groups are never split).
    blocks_per_task: ``config.neighbours.block_size`` query blocks per neighbour task.
    target_shards: split the corpus too (flat index only); per-shard top-k merged exactly.
    keep_work: keep the work directory after the plan is written (default: remove it).
    retries: extra attempts of a task that raised (worker deaths are retried by Dask anyway).
    """
    config = MiningConfig.of(config)
    # fsspec URLs: inputs are fetched to the cache ($B3MINE_CACHE: on a multi-host cluster, a
    # path every worker sees); a URL output is staged locally and published when written.
    src = storage.local_source(_as_source(source))
    out, publish_to = storage.local_output(out)
    out = check_output_dir(out)
    job_id = job_id_for(src, config)
    record = out / ".work" / f"{job_id}.json"
    cached = _cached_plan(out, record)
    if cached is not None:
        if publish_to:
            storage.publish_plan(cached.path, publish_to)
        return JobResult(plan=cached, job_id=job_id,
                         stages={s: "cached" for s in _stages(config)})
    if target_shards > 1 and config.neighbours.index != "flat":
        raise ValueError("target_shards > 1 needs the exact flat index (IVF/HNSW indexes are "
                         "built once over the whole corpus)")
    work = WorkDir(out / ".work" / job_id)
    work.root.parent.mkdir(parents=True, exist_ok=True)
    # work directories of dead jobs that never finished loading: nothing there to resume
    remove_orphans(work.root.parent, "", keep=lambda d: WorkDir(d).is_done("load"))
    with writer_lock(work.root.with_name(job_id + LOCK_SUFFIX)):
        work.root.mkdir(parents=True, exist_ok=True)
        work.clean_tmp()
        job = _Job(work=work, job_id=job_id, config=config, out=out, callback=progress,
                   retries=retries, fail_stage=os.environ.get(FAIL_ENV) or None,
                   delay=float(os.environ.get(DELAY_ENV) or 0.0))
        try:
            with connect(client=client, scheduler=scheduler, workers=workers,
                         threads_per_worker=threads_per_worker) as dask:
                job.client = dask
                result = job.run(src, shard_rows=shard_rows, blocks_per_task=blocks_per_task,
                                 target_shards=target_shards, report=report,
                                 lineage=lineage)
        except BaseException:
            if not work.is_done("load"):  # a failed load leaves only sparse, unusable files
                work.remove()
            raise
    if publish_to:
        storage.publish_plan(result.plan.path, publish_to)
    write_json(record, {"job_id": job_id, "state": "done", "stage": "write", "fraction": 1.0,
                        "plan_id": result.plan.plan_id, "plan": str(result.plan.path),
                        "stages": result.stages, "timings": result.timings,
                        "updated_at": time.time()})
    if not keep_work:
        work.remove()
    return result


def _stages(config: MiningConfig) -> tuple[str, ...]:
    return PIPELINE_STAGES if config.region_size is None else regions.REGION_STAGES


def _cached_plan(out: Path, record: Path) -> BatchPlan | None:
    try:
        plan_id = json.loads(record.read_text())["plan_id"]
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        return None
    path = out / plan_id
    return BatchPlan.open(path) if (path / MANIFEST).is_file() else None


@dataclass
class _Job:
    work: WorkDir
    job_id: str
    config: MiningConfig
    out: Path
    callback: ProgressCallback | None
    retries: int
    fail_stage: str | None
    delay: float
    client: Client | None = None
    statuses: dict[str, str] = field(default_factory=dict)
    metas: dict[str, dict[str, Any]] = field(default_factory=dict)
    _callback_error: BaseException | None = None

    def __post_init__(self) -> None:
        self.progress_file = ProgressFile(self.work.path("progress.json"), self.job_id)

    # -- plumbing ------------------------------------------------------------------------------
    @property
    def root(self) -> str:
        return str(self.work.root)

    def report(self, stage: str, fraction: float, status: str | None = None) -> None:
        self.progress_file.update(stage, fraction, status=status)
        if self.callback is not None:
            try:
                self.callback(stage, fraction)
            except BaseException as exc:
                # The caller's own exception (the service cancels a job by raising from its
                # callback): it must reach the caller as is, not as a failed stage.
                self._callback_error = exc
                raise

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        assert self.client is not None
        # pure=False: a fresh key per run, so a resumed job never picks up an old erred task.
        return self.client.submit(fn, *args, pure=False, retries=self.retries, **kwargs)

    def one(self, stage: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a single-task stage body, failing it on purpose when the test hook says so."""
        return self.submit(fn, *args, fail=self.fail_stage == stage, **kwargs).result()

    def gather(self, stage: str, futures: list[Future], done: int = 0, total: int | None = None
               ) -> list[Any]:
        """Results in completion order, reporting progress as each task finishes."""
        total = total or len(futures)
        results = []
        try:
            for fut in as_completed(futures):
                results.append(fut.result())
                done += 1
                self.report(stage, done / max(total, 1))
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
        return results

    def stage(self, name: str, body: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        if self.work.is_done(name):
            self.statuses[name] = "skipped"
            self.metas[name] = self.work.meta(name)
            self.report(name, 1.0, status="skipped")
            return self.metas[name]
        self.report(name, 0.0, status="running")
        start = time.perf_counter()
        try:
            meta = body()
        except Exception as exc:
            if exc is self._callback_error:
                self.progress_file.finish("cancelled", failed_stage=name)
                raise
            self.progress_file.finish("failed", failed_stage=name,
                                      error=f"{type(exc).__name__}: {exc}")
            raise StageError(name, self.job_id, self.work.root, exc) from exc
        meta["seconds"] = round(time.perf_counter() - start, 3)
        self.work.mark_done(name, meta)
        self.statuses[name], self.metas[name] = "ran", meta
        self.report(name, 1.0, status="done")
        return meta

    def timings(self, names: tuple[str, ...]) -> dict[str, float]:
        """Seconds of the stages among ``names`` that ran now, and of their steps as
        ``<stage>.<step>`` (e.g. ``neighbours.index_train``: part of ``neighbours``)."""
        out: dict[str, float] = {}
        for name in names:
            if self.statuses.get(name) == "ran":
                out[name] = float(self.metas[name]["seconds"])
                out.update({f"{name}.{k}": v for k, v in self.metas[name].get("steps", {})
                            .items()})
        return out

    # -- the stages --------------------------------------------------------------------------
    def run(self, source: EmbeddingSource, *, shard_rows: int, blocks_per_task: int,
            target_shards: int, report: bool, lineage: PlanLineage | None = None
            ) -> JobResult:
        config = self.config
        load = self.stage("load", lambda: self._load(source, shard_rows))
        plan_id = plan_id_for(load["fingerprint"], config)
        if (self.out / plan_id / MANIFEST).is_file():  # same data mined before (any engine)
            self.progress_file.finish("done", plan_id=plan_id)
            return JobResult(plan=BatchPlan.open(self.out / plan_id), job_id=self.job_id,
                             stages={**self.statuses, **{s: "cached" for s in
                                                         _stages(config)[1:]}})
        nb = self.stage("neighbours", lambda: self._neighbours(load, blocks_per_task,
                                                               target_shards))
        if config.region_size is not None:  # region-parallel stages (pipelines/regions.py)
            path, timings = regions.run(self, load, nb, report=report)
            self.progress_file.finish("done", plan_id=plan_id)
            return JobResult(plan=BatchPlan.open(path), job_id=self.job_id,
                             stages=dict(self.statuses), timings=timings)
        graph = self.stage("graph", lambda: self.one(
            "graph", stages.graph_task, self.root, config, nb["parts"]))
        clusters = self.stage("clusters", lambda: self.one(
            "clusters", stages.clusters_task, self.root, config, graph["n_nodes"]))
        self.stage("batches", lambda: self.one(
            "batches", stages.batches_task, self.root, config, clusters, graph["n_nodes"]))
        self.stage("negatives", lambda: self.one(
            "negatives", stages.negatives_task, self.root, config, load, nb["parts"],
            clusters))
        # This run's times only: a skipped stage's seconds belong to the run that did it.
        before = PIPELINE_STAGES[:-1]
        timings = self.timings(before)
        skipped = [s for s in before if self.statuses[s] == "skipped"]
        written = self.stage("write", lambda: {"plan": self.one(
            "write", stages.write_task, self.root, config, str(self.out), self.metas, timings,
            report=report, skipped_stages=skipped, lineage=lineage)})
        timings["write"] = float(written["seconds"])
        self.progress_file.finish("done", plan_id=plan_id)
        return JobResult(plan=BatchPlan.open(written["plan"]), job_id=self.job_id,
                         stages=dict(self.statuses), timings=timings)

    def _load(self, source: EmbeddingSource, shard_rows: int) -> dict[str, Any]:
        plan = stages.plan_source(source, shard_rows)
        # the core's checks (one full batch, a window that fits), before any vector is read
        self.config.check_fits(plan.n_rows, plan.label)
        stages.allocate_vectors(self.work, plan, self.config.normalize)
        total = len(plan.shards) + plan.id_buckets + 1
        futures = [self.submit(stages.load_shard, self.root, plan, a, b, self.config.normalize)
                   for a, b in plan.shards]
        id_dtypes = self.gather("load", futures, total=total)
        futures = [self.submit(stages.id_bucket_task, self.root, plan, b)
                   for b in range(plan.id_buckets)]
        duplicates = self.gather("load", futures, done=len(plan.shards), total=total)
        meta = self.one("load", stages.finish_load, self.root, plan, self.config.normalize,
                        id_dtypes, duplicates)
        meta["shards"] = len(plan.shards)
        return meta

    def _build_ivf(self, n: int, fail: bool) -> dict[str, float]:
        """One task trains the IVF quantizer, one task per row range fills its lists, one
        merges them into an on-disk index: no task holds more than a range of the corpus.
        Returns the seconds of each step."""
        steps, start = {}, time.perf_counter()
        if not self.work.path(stages.IVF_TRAINED).exists():
            self.submit(stages.train_ivf_task, self.root, self.config, fail=fail).result()
        steps["index_train"], start = _since(start), time.perf_counter()
        ranges = stages.ivf_fill_ranges(n)
        todo = [(a, b) for a, b in ranges if not stages.ivf_part_path(self.work, a, b).exists()]
        for fut in [self.submit(stages.fill_ivf_task, self.root, a, b) for a, b in todo]:
            fut.result()
        steps["index_fill"], start = _since(start), time.perf_counter()
        self.submit(stages.merge_ivf_task, self.root, ranges).result()
        steps["index_merge"] = _since(start)
        return steps

    def _neighbours(self, load: dict[str, Any], blocks_per_task: int, target_shards: int
                    ) -> dict[str, Any]:
        config, n = self.config, int(load["n_rows"])
        k = min(config.rank_depth, n)  # as b3mine.neighbours.search: never deeper than the corpus
        fail = self.fail_stage == "neighbours"
        steps: dict[str, float] = {}
        if config.neighbours.index == "ivf" and not self.work.path(stages.INDEX).exists():
            steps = self._build_ivf(n, fail)
            fail = False
        elif config.neighbours.index == "hnsw" and not self.work.path(stages.INDEX).exists():
            # one task builds the graph index; workers then load the saved file once each
            self.submit(stages.build_ann_index, self.root, config, fail=fail).result()
            fail = False
        start = time.perf_counter()
        block = config.neighbours.block_size * max(1, blocks_per_task)
        shards = max(1, target_shards)
        parts = [(stages.part_name(a, min(a + block, n), shards), a, min(a + block, n))
                 for a in range(0, n, block)]
        # resume inside the stage: a block whose part file exists is finished
        todo = [p for p in parts if not stages.part_path(self.work, p[0]).exists()]
        done = len(parts) - len(todo)
        if target_shards <= 1:
            futures = [self.submit(stages.search_block, self.root, config, name, a, b, k,
                                   self.delay, fail=fail and j == 0)
                       for j, (name, a, b) in enumerate(todo)]
        else:
            edges = np.linspace(0, n, target_shards + 1).astype(int) if n else [0, 0]
            futures = []
            for name, a, b in todo:
                shards = [self.submit(stages.search_corpus_shard, self.root, config, a, b, k,
                                      int(ts), int(te))
                          for ts, te in zip(edges[:-1], edges[1:]) if te > ts]
                futures.append(self.submit(stages.merge_block, self.root, name, a, b, k, *shards))
        self.gather("neighbours", futures, done=done, total=len(parts))
        assert self.client is not None
        try:
            self.client.run(stages.release_indexes)
        except Exception:  # noqa: BLE001 - only frees memory; a worker may be restarting
            pass
        steps["search"] = _since(start)
        return {"parts": [name for name, _, _ in parts], "k": k, "blocks": len(parts),
                "resumed_blocks": done, "steps": steps}

