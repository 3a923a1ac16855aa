"""Background execution of mining jobs, off the event loop.

Jobs run in a small thread pool (``Settings.job_workers``). The engine is pluggable:

* ``local`` — ``b3mine.cli.run_engine("local", ...)``, i.e. ``b3mine.mining.mine``, in a spawned
  child process per job (``service.worker``): METIS and friends hold the GIL for seconds, and
  serving latency must not depend on mining;
* ``dask`` — the ``b3mine.engines`` entry point (``pipelines.engine:mine``), called the same way
  with ``Settings.engine_options`` (scheduler, workers); the thread only waits on the cluster.

Progress and cancellation share one path: the engine's ``progress(stage, fraction)`` callback
writes the job row (throttled) and reads its ``cancel_requested`` flag in the same call, raising
``Interrupted`` to unwind the engine — so a DELETE served by any worker process cancels the job,
at the engine's next progress report.
"""
from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from b3mine.config import EmbeddingSource, MiningConfig
from b3mine.errors import B3MineError
from b3mine.plan import BatchPlan, PlanLineage
from b3mine.progress import overall_fraction

from service.datasets import (
    PATH_FIELDS,
    absolute_source,
    check_source_under_root,
    is_url,
    relative_paths,
)
from service.errors import ApiError
from service.jobs import Interrupted, JobRegistry, new_owner
from service.metrics import Metrics
from service.settings import Settings
from service.worker import JobFailed, mine_in_child

log = logging.getLogger("b3mine.service")

#: ``hook(job_id, stage, fraction)`` runs inside every progress callback, after the registry
#: is updated: instrumentation, and in tests a way to hold a job in ``running``.
ProgressHook = Callable[[str, str, float], None]
PROGRESS_INTERVAL_S = 0.25  # at most ~4 registry writes per second per job
RETRY_MAX_S = 5.0  # longest wait between retries of a failed registry write


class JobRunner:
    def __init__(self, registry: JobRegistry, settings: Settings, metrics: Metrics | None = None,
                 *, hook: ProgressHook | None = None) -> None:
        self.registry, self.settings, self.metrics, self.hook = registry, settings, metrics, hook
        self.owner = new_owner()
        self._stopping = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=settings.job_workers,
                                        thread_name_prefix="b3mine-job")

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> tuple[list[str], list[str]]:
        """Apply the restart policy (see ``service.jobs``) and resume the queued jobs."""
        failed, queued = self.registry.recover(self.owner)
        for job_id in failed:
            log.warning("job %s was running when the service stopped: marked failed", job_id)
        for job_id in queued:
            self.submit(job_id)
        return failed, queued

    def close(self) -> None:
        """Stop taking jobs; running ones stop at their next progress report.

        Their rows are left ``running`` on purpose: a clean stop and a crash then take the same
        path at the next start (``recover``), which is the path the tests exercise.
        """
        self._stopping.set()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def submit(self, job_id: str) -> None:
        if not self._stopping.is_set():
            self._pool.submit(self._run, job_id)

    # -- one job -------------------------------------------------------------------------------
    def _retry(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run a registry write until it succeeds (or the runner stops): a failed write
        (read-only or locked database, full disk) is retried, never dropped."""
        delay = 0.2
        while True:
            try:
                return fn()
            except sqlite3.Error as exc:
                if self._stopping.is_set():
                    raise Interrupted("shutdown") from exc
                log.warning("job registry: %s failed (%s); retrying in %.1f s", what, exc,
                            delay)
                self._stopping.wait(delay)
                delay = min(delay * 2, RETRY_MAX_S)

    def _run(self, job_id: str) -> None:
        if self._stopping.is_set():
            return
        try:
            job = self._retry("claim", lambda: self.registry.claim(job_id, self.owner))
        except Interrupted:
            return
        if job is None:  # cancelled while queued, or a sibling worker claimed it
            return
        try:
            source = EmbeddingSource.model_validate_json(job.dataset)
            config = MiningConfig.model_validate_json(job.config)
            lineage = PlanLineage.model_validate_json(job.lineage) if job.lineage else None
            plan = self._mine(job_id, source, config, job.engine, lineage)
        except JobFailed as exc:
            if exc.bug:
                log.error("job %s failed in the mining process: %s", job_id, exc)
            self._finish(job_id, "failed", error=str(exc).splitlines()[0])
            return
        except Interrupted as exc:
            if exc.reason == "cancelled":
                self._finish(job_id, "cancelled", error="cancelled by request")
            # "shutdown"/"lost": leave the row to the next start's recovery (or its new owner).
            return
        except (B3MineError, ApiError, ValueError, OSError) as exc:
            self._finish(job_id, "failed", error=str(exc) or type(exc).__name__)
            return
        except Exception as exc:  # an engine bug must end the job, not kill the worker
            log.exception("job %s failed", job_id)
            self._finish(job_id, "failed", error=f"{type(exc).__name__}: {exc}")
            return
        self._finish(job_id, "succeeded", plan_id=plan.plan_id)

    def _finish(self, job_id: str, state: str, **kw: Any) -> None:
        if "error" in kw and kw["error"]:
            kw["error"] = relative_paths(kw["error"], self.settings)
        try:
            done = self._retry("finish", lambda: self.registry.finish(
                job_id, self.owner, state, **kw))  # type: ignore[arg-type]
        except Interrupted:  # stopping: the next start's recovery settles the row
            return
        if done and self.metrics:
            self.metrics.jobs_finished.labels(state).inc()

    def _progress_callback(self, job_id: str) -> Callable[[str, float], None]:
        last = {"stage": "", "t": 0.0, "overall": 0.0}

        def progress(stage: str, fraction: float) -> None:
            if self._stopping.is_set():
                raise Interrupted("shutdown")
            now = time.monotonic()
            # The row holds the whole job's progress (never going back: Dask reports the report
            # stage inside its write), beside the stage now running.
            overall = overall_fraction(stage, fraction)
            last["overall"] = max(last["overall"], overall if overall is not None else 0.0)
            # Throttled: engines may report thousands of times; stage changes always go through.
            if stage != last["stage"] or fraction >= 1.0 or now - last["t"] >= PROGRESS_INTERVAL_S:
                last["stage"], last["t"] = stage, now
                try:
                    self.registry.progress(job_id, self.owner, stage, last["overall"])
                except sqlite3.Error as exc:  # progress is best effort: mining goes on
                    log.warning("job %s: progress not recorded (%s)", job_id, exc)
            if self.hook is not None:
                self.hook(job_id, stage, fraction)
                if self._stopping.is_set():
                    raise Interrupted("shutdown")

        return progress

    def _mine(self, job_id: str, source: EmbeddingSource, config: MiningConfig, engine: str,
              lineage: PlanLineage | None = None) -> Any:
        from b3mine.cli import run_engine

        settings = self.settings
        check_source_under_root(source, settings)  # again: a symlink planted since submission
        source = absolute_source(source, settings)
        options: dict[str, Any] = {}
        if engine == "local":
            source = _materialise_urls(source, settings)
        else:
            options = dict(settings.engine_options)
        progress = self._progress_callback(job_id)
        progress("start", 0.0)  # first registry touch: honours a cancel sent before we began
        if engine != "local":  # the thread only waits on the cluster
            return run_engine(engine, source, config, settings.plans, options, progress,
                              lineage)

        def check() -> None:
            if self._stopping.is_set():
                raise Interrupted("shutdown")
            try:
                self.registry.check(job_id, self.owner)
            except sqlite3.Error as exc:  # cannot tell: keep mining, ask again later
                log.warning("job %s: cancel flag not readable (%s)", job_id, exc)

        path = mine_in_child(engine, source.model_dump_json(), config.model_dump_json(),
                             settings.plans, options, progress, check, nice=settings.mining_nice,
                             lineage_json=lineage.model_dump_json() if lineage else None)
        return BatchPlan.open(path)


def _materialise_urls(source: EmbeddingSource, settings: Settings) -> EmbeddingSource:
    """The local engine reads local files: copy fsspec URLs into a cache under the data root."""
    urls = {n: getattr(source, n) for n in PATH_FIELDS
            if getattr(source, n) is not None and is_url(getattr(source, n))}
    if not urls:
        return source
    import fsspec

    cache = settings.cache / "fsspec"
    update = {name: fsspec.open_local(f"filecache::{url}",
                                      filecache={"cache_storage": str(cache)})
              for name, url in urls.items()}
    return source.model_copy(update=update)
