"""The FastAPI application: ``create_app(settings) -> FastAPI``.

>>> app = create_app(Settings(data_root="/srv/b3mine", api_keys=["s3cret"]))   # doctest: +SKIP

``uvicorn --factory service.app:create_app_from_env`` (what ``b3mine serve`` runs) builds it
from ``B3MINE_*`` environment variables.
"""
from __future__ import annotations

import logging
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from b3mine.errors import B3MineError, InputError, PlanError
from b3mine.writers import remove_orphans

from service import api_jobs, api_plans
from service.auth import make_guards
from service.context import Context
from service.datasets import relative_paths
from service.errors import ApiError, ErrorResponse
from service.jobs import JobRegistry
from service.limits import BodyLimitMiddleware
from service.metrics import Metrics, MetricsMiddleware
from service.plans import PlanStore
from service.runner import JobRunner, ProgressHook
from service.settings import Settings

log = logging.getLogger("b3mine.service")

DESCRIPTION = """Batch plans for contrastive training, mined on demand and served to trainers.

* `POST /v1/jobs` mines a plan (202 + `Location`); poll `GET /v1/jobs/{id}`.
* `GET /v1/plans/{id}/epochs/{e}/batches` pages an epoch as JSON, or streams it as Arrow IPC
  with `Accept: application/vnd.apache.arrow.stream`.
* Plan responses are immutable: strong ETags, `If-None-Match` -> 304.
* Errors: `{"error": {"field": "...", "message": "..."}}`.
"""


def _error(status: int, message: str, field: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"field": field, "message": message}}, status_code=status,
                        headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.field, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        field = ".".join(str(p) for p in first.get("loc", ())) or None
        message = str(first.get("msg", "invalid request"))
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more: " + "; ".join(
                f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}"
                for e in errors[1:5]) + ")"
        return _error(422, message, field)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), None, getattr(exc, "headers", None))

    @app.exception_handler(B3MineError)
    async def library_error(request: Request, exc: B3MineError) -> JSONResponse:
        status = 404 if isinstance(exc, PlanError) else 400
        field = getattr(exc, "column", None) if isinstance(exc, InputError) else None
        return _error(status, relative_paths(str(exc), request.app.state.ctx.settings), field)

    @app.exception_handler(sqlite3.Error)
    async def registry_error(_: Request, exc: sqlite3.Error) -> JSONResponse:
        log.warning("job registry error: %s", exc)
        return _error(503, f"job registry unavailable ({exc}); retry later", None,
                      {"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error(500, "internal error")


def create_app(settings: Settings | None = None, *,
               progress_hook: ProgressHook | None = None) -> FastAPI:
    """Build the app over ``settings`` (default: from the environment).

    ``progress_hook(job_id, stage, fraction)`` runs in every job's progress callback (used for
    instrumentation, and by the tests to hold a job in ``running``).
    """
    settings = settings or Settings()
    settings.data_root.mkdir(parents=True, exist_ok=True)
    settings.plans.mkdir(parents=True, exist_ok=True)
    registry = JobRegistry(settings.db)
    store = PlanStore(settings.plans, settings.cache, epoch_cache=settings.epoch_cache,
                      batch_cache=settings.batch_cache, plans_url=settings.plans_url)
    metrics = Metrics(registry.counts, lambda: {
        "batch": (store.batches.hits, store.batches.misses)})
    runner = JobRunner(registry, settings, metrics, hook=progress_hook)
    require_write, require_read, require_job_read = make_guards(settings)
    ctx = Context(settings, registry, runner, store, metrics, require_write, require_read,
                  require_job_read)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        remove_orphans(settings.plans, ".tmp-")  # plans half-written by killed writers
        failed, queued = await run_in_threadpool(runner.start)
        log.info("job registry %s: %d interrupted jobs marked failed, %d queued resumed",
                 settings.db, len(failed), len(queued))
        try:
            yield
        finally:
            runner.close()
            registry.close()

    app = FastAPI(title="b3mine", version="1", description=DESCRIPTION, lifespan=lifespan,
                  responses={500: {"model": ErrorResponse, "description": "bug: please report"}})
    app.state.ctx = ctx
    _install_error_handlers(app)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    app.include_router(api_jobs.router(ctx))
    app.include_router(api_plans.router(ctx))

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], responses={503: {"model": ErrorResponse}})
    def readyz() -> Response:
        """Readiness: the job registry file on disk takes a write, and the plans directory is
        readable."""
        try:
            registry.check_writable()
            settings.plans.stat()
        except Exception as exc:  # sqlite3.Error, OSError: not ready, say why
            return _error(503, f"not ready: {exc}")
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", tags=["ops"], response_class=Response,
             responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}})
    def prometheus() -> Response:
        """Prometheus metrics (requests, latency histogram, jobs by state, cache hits)."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def create_app_from_env() -> FastAPI:
    return create_app(Settings())
