"""Background execution of mining jobs, off the event loop.

Jobs run in a small thread pool (``Settings.job_workers``). The engine is pluggable:

* ``local`` — ``b3mine.cli.run_engine("local", ...)``, i.e. ``b3mine.mining.mine`` in the worker
  thread (numpy/FAISS release the GIL for the heavy parts);
* ``dask`` — the ``b3mine.engines`` entry point (``pipelines.engine:mine``), called the same way
  with ``Settings.engine_options`` (scheduler, workers); the thread only waits on the cluster.

Progress and cancellation share one path: the engine's ``progress(stage, fraction)`` callback
writes the job row (throttled) and reads its ``cancel_requested`` flag in the same call, raising
``Interrupted`` to unwind the engine — so a DELETE served by any worker process cancels the job,
at the engine's next progress report.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from b3mine.config import EmbeddingSource, MiningConfig
from b3mine.errors import B3MineError
from b3mine.plan import PlanLineage

from service.datasets import PATH_FIELDS, absolute_source, is_url
from service.jobs import Interrupted, JobRegistry, new_owner
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger("b3mine.service")

#: ``hook(job_id, stage, fraction)`` runs inside every progress callback, after the registry
#: is updated: instrumentation, and in tests a way to hold a job in ``running``.
ProgressHook = Callable[[str, str, float], None]
PROGRESS_INTERVAL_S = 0.25  # at most ~4 registry writes per second per job


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
    def _run(self, job_id: str) -> None:
        if self._stopping.is_set():
            return
        job = self.registry.claim(job_id, self.owner)
        if job is None:  # cancelled while queued, or a sibling worker claimed it
            return
        try:
            source = EmbeddingSource.model_validate_json(job.dataset)
            config = MiningConfig.model_validate_json(job.config)
            lineage = PlanLineage.model_validate_json(job.lineage) if job.lineage else None
            plan = self._mine(job_id, source, config, job.engine, lineage)
        except Interrupted as exc:
            if exc.reason == "cancelled":
                self._finish(job_id, "cancelled", error="cancelled by request")
            # "shutdown"/"lost": leave the row to the next start's recovery (or its new owner).
            return
        except (B3MineError, ValueError, OSError) as exc:
            self._finish(job_id, "failed", error=str(exc) or type(exc).__name__)
            return
        except Exception as exc:  # an engine bug must end the job, not kill the worker
            log.exception("job %s failed", job_id)
            self._finish(job_id, "failed", error=f"{type(exc).__name__}: {exc}")
            return
        self._finish(job_id, "succeeded", plan_id=plan.plan_id)

    def _finish(self, job_id: str, state: str, **kw: Any) -> None:
        if self.registry.finish(job_id, self.owner, state, **kw) and self.metrics:  # type: ignore[arg-type]
            self.metrics.jobs_finished.labels(state).inc()

    def _progress_callback(self, job_id: str) -> Callable[[str, float], None]:
        last = {"stage": "", "t": 0.0}

        def progress(stage: str, fraction: float) -> None:
            if self._stopping.is_set():
                raise Interrupted("shutdown")
            now = time.monotonic()
            # Throttled: engines may report thousands of times; stage changes always go through.
            if stage != last["stage"] or fraction >= 1.0 or now - last["t"] >= PROGRESS_INTERVAL_S:
                last["stage"], last["t"] = stage, now
                self.registry.progress(job_id, self.owner, stage, fraction)
            if self.hook is not None:
                self.hook(job_id, stage, fraction)
                if self._stopping.is_set():
                    raise Interrupted("shutdown")

        return progress

    def _mine(self, job_id: str, source: EmbeddingSource, config: MiningConfig, engine: str,
              lineage: PlanLineage | None = None) -> Any:
        from b3mine.cli import run_engine

        settings = self.settings
        source = absolute_source(source, settings)
        options: dict[str, Any] = {}
        if engine == "local":
            source = _materialise_urls(source, settings)
        else:
            options = dict(settings.engine_options)
        progress = self._progress_callback(job_id)
        progress("start", 0.0)  # first registry touch: honours a cancel sent before we began
        return run_engine(engine, source, config, settings.plans, options, progress, lineage)


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
