"""``/v1/plans``: plans, their epochs as JSON pages or Arrow streams, and single batches.

Every plan response carries a strong ETag derived from the (immutable) plan id and whatever
shapes the body — path, query, representation — and answers ``If-None-Match`` with 304.
"""
from __future__ import annotations

from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Header, Path, Query, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from b3mine.plan import BatchPlan

from service.context import Context
from service.errors import ApiError, error_responses
from service.lineage import lineage_family
from service.models import BatchPage, PlanDetail, PlanList, PlanSummary, RankBatch
from service.plans import (ARROW_STREAM, PAGE_GROUP, EpochView, dumps, etag, etag_matches,
                           json_page_chunks)
from b3mine.sharding import ShardError, rank_slice

MAX_INT = 2**31 - 1
ARROW_DOC = {ARROW_STREAM: {"schema": {"type": "string", "format": "binary"}}}


def wants_arrow(accept: str | None) -> bool:
    """True if the client prefers an Arrow IPC stream to JSON (by Accept q-values)."""
    if not accept:
        return False
    q = {}
    for item in accept.split(","):
        media, *params = (part.strip() for part in item.split(";"))
        weight = 1.0
        for param in params:
            if param.startswith("q="):
                try:
                    weight = float(param[2:])
                except ValueError:
                    weight = 0.0
        q[media.lower()] = weight
    arrow = q.get(ARROW_STREAM, 0.0)
    return arrow > 0 and arrow >= q.get("application/json", 0.0)


def router(ctx: Context) -> APIRouter:
    r = APIRouter(prefix="/v1/plans", tags=["plans"], dependencies=[Depends(ctx.require_read)])
    store, settings = ctx.store, ctx.settings
    cache_control = ("private" if settings.require_key_for_reads else "public") + \
        ", max-age=31536000, immutable"

    def cache_headers(tag: str) -> dict[str, str]:
        return {"ETag": tag, "Cache-Control": cache_control, "Vary": "Accept, X-API-Key"}

    def not_modified(tag: str) -> Response:
        return Response(status_code=304, headers=cache_headers(tag))

    async def epoch_view(plan: BatchPlan, epoch: int) -> EpochView:
        store.check_epoch(plan, epoch)
        view = store.cached_epoch(plan.plan_id, epoch)
        if view is None:  # first touch builds/maps the cache file: keep it off the event loop
            view = await run_in_threadpool(store.epoch, plan, epoch)
        return view

    plan_id_param = Path(max_length=128, description="a plan id, as GET /v1/plans lists")
    epoch_param = Path(ge=0, le=MAX_INT)

    @r.get("", response_model=PlanList, responses=error_responses(401, 403, 422))
    def list_all(lineage: str | None = Query(
            None, max_length=128, description="a training run or a plan id: only the plans "
            "of that run (and their ancestors), or that plan and its descendants")) -> PlanList:
        """Every complete plan under the plans directory (or one lineage family of them)."""
        manifests = {}
        for pid in store.plan_ids():
            try:
                manifests[pid] = store.plan(pid).manifest
            except ApiError:  # unreadable plans are skipped, not fatal
                continue
        ids = list(manifests) if lineage is None else lineage_family(
            lineage, {pid: m.lineage for pid, m in manifests.items()})
        return PlanList(plans=[PlanSummary(
            plan_id=pid, created_at=m.created_at, n_rows=m.dataset.n_rows,
            epochs=m.counts.epochs, batch_size=m.counts.batch_size,
            batches_per_epoch=m.counts.batches_per_epoch,
            extra_negatives=m.counts.extra_negatives, url=f"/v1/plans/{pid}",
            lineage=m.lineage) for pid, m in ((p, manifests[p]) for p in ids)])

    @r.get("/{plan_id}", response_model=PlanDetail,
           responses={304: {"description": "not modified"}, **error_responses(401, 403, 404,
                                                                             422)})
    def get_plan(plan_id: str = plan_id_param,
                 if_none_match: str | None = Header(None)) -> Response:
        """The plan's manifest (config, dataset, counts, stats) and its quality report."""
        plan = store.plan(plan_id)
        tag = etag(plan.plan_id, "plan")
        if etag_matches(if_none_match, tag):
            return not_modified(tag)
        body = PlanDetail(manifest=plan.manifest, report=plan.report(), links={
            f"epoch_{e}": f"/v1/plans/{plan_id}/epochs/{e}/batches" for e in range(plan.epochs)})
        return Response(body.model_dump_json().encode(), media_type="application/json",
                        headers=cache_headers(tag))

    @r.get("/{plan_id}/epochs/{epoch}/batches", response_model=BatchPage,
           responses={200: {"content": ARROW_DOC, "description": "a JSON page, or with "
                            f"Accept: {ARROW_STREAM} an Arrow IPC stream (columns batch, "
                            "position, row, id, cluster, padded[, negatives])"},
                      304: {"description": "not modified"},
                      **error_responses(400, 401, 403, 404, 422)})
    async def page(
        plan_id: str = plan_id_param,
        epoch: int = epoch_param,
        start: int = Query(0, ge=0, le=MAX_INT, description="first batch of the page"),
        limit: int | None = Query(None, ge=1, le=MAX_INT, description="batches in the page "
                                  "(JSON: default and maximum set by the service; Arrow: "
                                  "default the rest of the epoch)"),
        accept: str | None = Header(None),
        if_none_match: str | None = Header(None),
    ) -> Response:
        """A page of an epoch's batches, in order: JSON, or an Arrow stream on request."""
        plan = store.plan(plan_id)
        store.check_epoch(plan, epoch)
        total = plan.batches_per_epoch
        arrow = wants_arrow(accept)
        if start >= max(total, 1):
            raise ApiError(400, f"start {start} is past the epoch's {total} batches",
                           "query.start")
        if not arrow and limit is not None and limit > settings.max_page:
            raise ApiError(400, f"limit {limit} is above this service's max_page "
                           f"{settings.max_page} (use Arrow for whole epochs)", "query.limit")
        size = limit or (total - start if arrow else settings.default_page)
        count = max(0, min(size, total - start))
        tag = etag(plan.plan_id, "page", epoch, start, limit, "arrow" if arrow else "json")
        if etag_matches(if_none_match, tag):
            return not_modified(tag)
        view = await epoch_view(plan, epoch)
        headers = cache_headers(tag)
        if arrow:
            b = plan.batch_size
            return StreamingResponse(view.arrow_chunks(start * b, count * b),
                                     media_type=ARROW_STREAM, headers=headers)
        nxt = None
        if start + count < total:
            query = {"start": start + count, **({"limit": limit} if limit else {})}
            nxt = f"/v1/plans/{plan_id}/epochs/{epoch}/batches?{urlencode(query)}"
        head = {"plan_id": plan.plan_id, "epoch": epoch, "start": start, "limit": size,
                "total": total}
        chunks = json_page_chunks(head, view, start, count, {"next": nxt})
        if count <= PAGE_GROUP:  # small pages: one body, one thread hop
            body = await run_in_threadpool(lambda: b"".join(chunks))
            return Response(body, media_type="application/json", headers=headers)
        return StreamingResponse(chunks, media_type="application/json", headers=headers)

    @r.get("/{plan_id}/epochs/{epoch}/batches/{batch}", response_model=RankBatch,
           responses={200: {"content": ARROW_DOC, "description": "the batch (or this rank's "
                            f"slice) as JSON, or with Accept: {ARROW_STREAM} an Arrow stream"},
                      304: {"description": "not modified"},
                      **error_responses(400, 401, 403, 404, 422)})
    async def one_batch(
        plan_id: str = plan_id_param,
        epoch: int = epoch_param,
        batch: int = Path(ge=0, le=MAX_INT),
        rank: int | None = Query(None, ge=0, le=MAX_INT, description="this trainer's rank"),
        world_size: int | None = Query(None, ge=1, le=MAX_INT, description="number of ranks; "
                                       "must divide the batch size"),
        accept: str | None = Header(None),
        if_none_match: str | None = Header(None),
    ) -> Response:
        """One batch with its extra hard negatives; with ``rank`` and ``world_size``, only the
        positions ``[rank*B/world_size, (rank+1)*B/world_size)`` (``b3mine.sharding``)."""
        plan = store.plan(plan_id)
        store.check_epoch(plan, epoch)
        if not batch < plan.batches_per_epoch:
            raise ApiError(404, f"epoch {epoch} has batches [0, {plan.batches_per_epoch}); no "
                           f"batch {batch}", "path.batch")
        if (rank is None) != (world_size is None):
            missing = "world_size" if world_size is None else "rank"
            raise ApiError(400, "rank and world_size go together", f"query.{missing}")
        positions = slice(0, plan.batch_size)
        if rank is not None and world_size is not None:
            try:
                positions = rank_slice(plan.batch_size, rank, world_size)
            except ShardError as exc:
                raise ApiError(400, str(exc), f"query.{exc.field}") from exc
        arrow = wants_arrow(accept)
        tag = etag(plan.plan_id, "batch", epoch, batch, rank, world_size,
                   "arrow" if arrow else "json")
        if etag_matches(if_none_match, tag):
            return not_modified(tag)
        headers = cache_headers(tag)
        if not arrow:
            key = (plan.plan_id, epoch, batch, rank, world_size)
            body = store.batches.get(key)
            if body is not None:
                return Response(body, media_type="application/json", headers=headers)
        view = await epoch_view(plan, epoch)
        if arrow:
            first = batch * plan.batch_size + positions.start
            data = b"".join(view.arrow_chunks(first, positions.stop - positions.start))
            return Response(data, media_type=ARROW_STREAM, headers=headers)
        out = view.batch_dict(batch, positions)
        out.update(plan_id=plan.plan_id, epoch=epoch, rank=rank, world_size=world_size,
                   positions=[positions.start, positions.stop])
        body = dumps(out)
        store.batches.put(key, body)
        return Response(body, media_type="application/json", headers=headers)

    return r
