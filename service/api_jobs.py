"""``/v1/jobs``: submit, poll, list and cancel mining jobs."""
from __future__ import annotations

import hashlib
from typing import Literal

from fastapi import APIRouter, Depends, Path, Query, Response, status
from starlette.concurrency import run_in_threadpool

from service.context import Context
from service.datasets import dataset_key, normalise_source, source_fingerprint
from service.errors import ApiError, error_responses
from service.limits import check_plan_size
from service.lineage import check_parent
from service.models import JobList, JobRequest, JobStatus

MAX_INT = 2**31 - 1


def job_id_for(dataset: str, fingerprint: str, config_digest: str,
               lineage: str | None = None) -> str:
    """Same dataset reference, same files (size/mtime), same config (and lineage, when one is
    given) -> same job."""
    text = f"b3mine-job-v1\0{dataset}\0{fingerprint}\0{config_digest}"
    if lineage is not None:  # jobs without lineage keep the ids they always had
        text += f"\0{lineage}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def router(ctx: Context) -> APIRouter:
    r = APIRouter(prefix="/v1/jobs", tags=["jobs"])

    @r.post("", status_code=202, response_model=JobStatus,
            dependencies=[Depends(ctx.require_write)],
            responses={200: {"model": JobStatus, "description": "the same request already "
                             "succeeded: the existing job, with its plan id"},
                       **error_responses(400, 401, 403, 413, 422, 503)})
    def submit(body: JobRequest, response: Response) -> JobStatus:
        """Queue a mining job (202, ``Location: /v1/jobs/{id}``).

        Submitting the same dataset and config again returns the existing job: 200 when it has
        already succeeded, 202 while it is queued or running; a failed or cancelled one is
        queued again.
        """
        settings = ctx.settings
        source = normalise_source(body.dataset, settings)
        check_plan_size(source, body.config, settings)
        key = dataset_key(source)
        check_parent(body.lineage, ctx.store.plan_ids())
        lineage = body.lineage.model_dump_json() if body.lineage else None
        job_id = job_id_for(key, source_fingerprint(source, settings), body.config.digest(),
                            lineage)
        job, outcome = ctx.registry.submit(job_id, key, body.config.canonical_json(),
                                           settings.engine, lineage)
        if outcome != "existing":
            ctx.runner.submit(job_id)
        response.headers["Location"] = f"/v1/jobs/{job_id}"
        if job.state == "succeeded":
            response.status_code = status.HTTP_200_OK
        return JobStatus.of(job)

    @r.get("", response_model=JobList, dependencies=[Depends(ctx.require_job_read)],
           responses=error_responses(401, 403, 422))
    async def list_jobs(
        state: Literal["queued", "running", "succeeded", "failed", "cancelled"] | None = None,
        limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0, le=MAX_INT),
    ) -> JobList:
        """Jobs, newest first."""
        jobs = await run_in_threadpool(ctx.registry.list, state, limit, offset)
        return JobList(jobs=[JobStatus.of(j) for j in jobs])

    @r.get("/{job_id}", response_model=JobStatus, dependencies=[Depends(ctx.require_job_read)],
           responses=error_responses(401, 403, 404, 422))
    def get_job(job_id: str = Path(max_length=128)) -> JobStatus:
        """A job's state: queued; running (with stage and progress); succeeded (with the plan
        id); failed (with the reason); cancelled."""
        job = ctx.registry.get(job_id)
        if job is None:
            raise ApiError(404, f"no job {job_id!r}", "path.job_id")
        return JobStatus.of(job)

    @r.delete("/{job_id}", response_model=JobStatus, dependencies=[Depends(ctx.require_write)],
              responses={202: {"model": JobStatus, "description": "cancellation requested: the "
                               "job stops at its next progress report"},
                         **error_responses(401, 403, 404, 409, 422)})
    def cancel_job(response: Response, job_id: str = Path(max_length=128)) -> JobStatus:
        """Cancel a job: a queued one at once (200), a running one at its next progress report
        (202). Cancelling a cancelled job is a no-op; a finished job gives 409."""
        job = ctx.registry.request_cancel(job_id)
        if job is None:
            raise ApiError(404, f"no job {job_id!r}", "path.job_id")
        if job.state in ("succeeded", "failed"):
            raise ApiError(409, f"job {job_id} already {job.state}", "path.job_id")
        if job.state == "running":
            response.status_code = status.HTTP_202_ACCEPTED
        return JobStatus.of(job)

    return r
