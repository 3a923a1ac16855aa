"""Request and response bodies of the REST API (they are what the OpenAPI spec documents)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from b3mine.config import EmbeddingSource, MiningConfig
from b3mine.plan import PlanLineage, PlanManifest

from service.jobs import Job


class JobRequest(BaseModel):
    """``POST /v1/jobs``: what to mine and how."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "dataset": {"path": "corpora/msmarco.parquet", "column": "embedding"},
        "config": {"batch_size": 1024, "cluster_size": 32, "p": 30, "m": 100}}]})

    dataset: EmbeddingSource = Field(description="embeddings; paths are relative to the "
                                     "service's data root (fsspec URLs only when enabled)")
    config: MiningConfig = Field(default_factory=MiningConfig)
    lineage: PlanLineage | None = Field(None, description="a refresh during training: the "
                                        "dataset holds a student's embeddings, parent names "
                                        "the plan it refreshes (see service.lineage)")


class JobLinks(BaseModel):
    self: str
    plan: str | None = None


class JobStatus(BaseModel):
    id: str
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    stage: str | None = Field(None, description="current stage while running (load, neighbours, "
                              "graph, clusters, batches, negatives, report, write)")
    progress: float = Field(description="fraction of the whole job done, in [0, 1], never "
                            "decreasing (stages weighted by a rough share of a run's time); "
                            "`stage` says which stage is running")
    plan_id: str | None = Field(None, description="set when succeeded")
    error: str | None = Field(None, description="why it failed or was cancelled")
    cancel_requested: bool
    engine: str
    attempts: int
    created_at: str
    updated_at: str
    started_at: str | None
    finished_at: str | None
    dataset: EmbeddingSource
    config: MiningConfig
    lineage: PlanLineage | None = None
    links: JobLinks

    @classmethod
    def of(cls, job: Job) -> JobStatus:
        return cls(
            id=job.id, state=job.state, stage=job.stage, progress=job.progress,
            plan_id=job.plan_id, error=job.error, cancel_requested=job.cancel_requested,
            engine=job.engine, attempts=job.attempts, created_at=job.created_at,
            updated_at=job.updated_at, started_at=job.started_at, finished_at=job.finished_at,
            dataset=EmbeddingSource.model_validate_json(job.dataset),
            config=MiningConfig.model_validate_json(job.config),
            lineage=PlanLineage.model_validate_json(job.lineage) if job.lineage else None,
            links=JobLinks(self=f"/v1/jobs/{job.id}",
                           plan=f"/v1/plans/{job.plan_id}" if job.plan_id else None))


class JobList(BaseModel):
    jobs: list[JobStatus]


class PlanSummary(BaseModel):
    plan_id: str
    created_at: str
    n_rows: int
    epochs: int
    batch_size: int
    batches_per_epoch: int
    extra_negatives: int
    url: str
    lineage: PlanLineage | None = None


class PlanList(BaseModel):
    plans: list[PlanSummary]


class PlanDetail(BaseModel):
    manifest: PlanManifest
    report: dict[str, Any] | None = Field(None, description="quality report (hardness of plan "
                                          "batches vs random batches), when computed")
    links: dict[str, str]


Ids = list[int] | list[str]


class BatchOut(BaseModel):
    """One batch (or one rank's slice of it); lists are aligned by position."""

    batch: int
    rows: list[int] = Field(description="dataset rows")
    ids: Ids = Field(description="dataset ids of those rows")
    clusters: list[int]
    padded: list[bool] = Field(description="true for rows a fill policy repeated")
    negatives: list[list[int]] | None = Field(
        None, description="extra hard-negative rows of each position (only when the plan has "
        "them)")
    negative_ids: list[list[int]] | list[list[str]] | None = Field(
        None, description="dataset ids of those negatives, aligned with negatives")


class BatchPage(BaseModel):
    plan_id: str
    epoch: int
    start: int
    limit: int
    total: int = Field(description="batches in the epoch")
    batches: list[BatchOut]
    next: str | None = Field(description="URL of the next page, null on the last one")


class RankBatch(BatchOut):
    plan_id: str
    epoch: int
    rank: int | None = None
    world_size: int | None = None
    positions: list[int] = Field(description="[first, end) positions of this slice in the batch")
