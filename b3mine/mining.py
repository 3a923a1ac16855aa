"""The mining job: embeddings -> neighbours -> graph -> clusters -> batches -> plan.

Each stage is a plain function so that the Dask pipeline (``pipelines/``) can run the same steps
over shards and checkpoint between them; ``mine`` runs them in-process.

>>> from b3mine import MiningConfig, mine                                      # doctest: +SKIP
>>> plan = mine("corpus.parquet", MiningConfig(batch_size=512), "plans")  # doctest: +SKIP
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from b3mine import clustering
from b3mine.batches import Batches, assemble_batches, cluster_affinity
from b3mine.config import EmbeddingSource, MiningConfig
from b3mine.embeddings import Embeddings, check_minimum_rows, load_embeddings
from b3mine.graph import degree_stats, window_graph
from b3mine.negatives import hnips, hnps, positive_scores
from b3mine.neighbours import Neighbours, search
from b3mine.plan import (
    BatchPlan,
    DatasetInfo,
    PlanCounts,
    PlanLineage,
    PlanTables,
    plan_id_for,
    write_plan,
)
from b3mine.progress import ProgressCallback, stage_progress
from b3mine.report import quality_report, report_json, report_png


# -- stages ----------------------------------------------------------------------------------

def prepare(emb: Embeddings, config: MiningConfig) -> Embeddings:
    check_minimum_rows(emb, config.batch_size)
    return emb.normalized() if config.normalize else emb


def compute_neighbours(emb: Embeddings, config: MiningConfig,
                       progress: ProgressCallback | None = None) -> Neighbours:
    return search(emb.queries, emb.target_matrix, config.rank_depth, config.neighbours, progress)


def build_graph(neighbours: Neighbours, config: MiningConfig) -> sp.csr_matrix:
    return window_graph(neighbours.window(config.p, config.m), mutual=config.graph == "mutual")


def make_clusters(graph: sp.csr_matrix, config: MiningConfig) -> clustering.Clusters:
    return clustering.cluster(graph, config)


def make_batches(clusters: clustering.Clusters, config: MiningConfig,
                 graph: sp.csr_matrix | None = None) -> Batches:
    affinity = None
    if config.batch_grouping == "affinity":
        if graph is None:
            raise ValueError("batch_grouping='affinity' needs the graph")
        affinity = cluster_affinity(graph, clusters.members)
    return assemble_batches(clusters.members, clusters.padded, batch_size=config.batch_size,
                            epochs=config.epochs, seed=config.seed, last_batch=config.last_batch,
                            affinity=affinity)


def make_negatives(emb: Embeddings, neighbours: Neighbours, clusters: clustering.Clusters,
                   config: MiningConfig, progress: ProgressCallback | None = None
                   ) -> np.ndarray | None:
    neg = config.negatives
    if neg.mode == "none":
        return None
    rng = np.random.default_rng([config.seed, 0x4E6])
    pos = positive_scores(emb.queries, emb.target_matrix)
    if neg.mode == "hnips":
        with stage_progress(progress, "negatives", 1):
            return hnips(neighbours, pos, config.p, neg, rng)
    return hnps(neighbours, clusters.members, emb.queries, emb.target_matrix, pos, config.p, neg,
                rng, progress)


def plan_counts(clusters: clustering.Clusters, batches: Batches, graph: sp.csr_matrix,
                config: MiningConfig) -> PlanCounts:
    n_clusters, k = clusters.members.shape
    slots = batches.batches_per_epoch * config.clusters_per_batch
    return PlanCounts(
        n_clusters=n_clusters,
        cluster_size=k,
        batch_size=config.batch_size,
        epochs=config.epochs,
        batches_per_epoch=batches.batches_per_epoch,
        # distinct examples differ per epoch when "drop" leaves out different clusters
        examples_per_epoch=[int((~p).sum()) for p in batches.padded],
        remainder_dropped=len(clusters.dropped),
        remainder_padded=int(clusters.padded.sum()),
        last_batch_padded=max(0, slots - n_clusters) * k,
        n_edges=int(graph.nnz // 2),
        extra_negatives=config.negatives.k if config.negatives.mode != "none" else 0,
    )


# -- the job ---------------------------------------------------------------------------------

@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[stage] = round(time.perf_counter() - start, 3)


def mine(
    embeddings: Embeddings | EmbeddingSource | str | Path,
    config: MiningConfig | None = None,
    out: str | Path = "plans",
    *,
    progress: ProgressCallback | None = None,
    report: bool = True,
    lineage: PlanLineage | None = None,
) -> BatchPlan:
    """Mine a batch plan and write it atomically under ``out/<plan_id>``.

    The plan id is a content hash of the embeddings and the config: mining the same inputs again
    returns the existing plan without recomputing it.
    """
    config = config or MiningConfig()
    timings: dict[str, float] = {}
    with _timed(timings, "load"), stage_progress(progress, "load", 1):
        raw = embeddings if isinstance(embeddings, Embeddings) else load_embeddings(embeddings)
        fingerprint = raw.fingerprint()
    plan_id = plan_id_for(fingerprint, config)
    existing = Path(out) / plan_id
    if (existing / "manifest.json").is_file():
        return BatchPlan.open(existing)
    emb = prepare(raw, config)
    with _timed(timings, "neighbours"):
        neighbours = compute_neighbours(emb, config, progress)
    with _timed(timings, "graph"), stage_progress(progress, "graph", 1):
        graph = build_graph(neighbours, config)
    with _timed(timings, "clusters"), stage_progress(progress, "clusters", 1):
        clustered = make_clusters(graph, config)
    with _timed(timings, "batches"), stage_progress(progress, "batches", 1):
        batches = make_batches(clustered, config, graph)
    with _timed(timings, "negatives"):
        negatives = make_negatives(emb, neighbours, clustered, config, progress)
    return finish_plan(emb, fingerprint, config, graph, clustered, batches, negatives, out,
                       timings=timings, progress=progress, report=report, lineage=lineage)


def finish_plan(
    emb: Embeddings,
    fingerprint: str,
    config: MiningConfig,
    graph: sp.csr_matrix,
    clustered: clustering.Clusters,
    batches: Batches,
    negatives: np.ndarray | None,
    out: str | Path,
    *,
    timings: dict[str, float] | None = None,
    progress: ProgressCallback | None = None,
    report: bool = True,
    lineage: PlanLineage | None = None,
) -> BatchPlan:
    """Report, assemble and atomically write the plan (the last stage of every engine)."""
    timings = dict(timings or {})
    stats: dict[str, Any] = {"graph": degree_stats(graph), "communities_found":
                             clustered.communities}
    extra: dict[str, bytes] = {}
    if report and batches.rows.size:
        with _timed(timings, "report"), stage_progress(progress, "report", 1):
            rep = quality_report(emb.queries, emb.target_matrix, batches.rows[0],
                                 clustered.community_sizes, seed=config.seed)
            extra["report.json"] = report_json(rep).encode()
            extra["report.png"] = report_png(rep, title=(
                f"{Path(emb.source).name}: {emb.n_rows:,} rows, {config.algorithm}, "
                f"K={config.cluster_size}, B={config.batch_size}, p={config.p}, m={config.m}, "
                f"{config.batch_grouping} grouping"))
            stats["quality"] = {k: rep[k] for k in ("mean_similarity_ratio",
                                                    "mean_similarity_gain",
                                                    "above_positive_ratio")}
            stats["quality"]["plan_mean"] = rep["plan"]["mean"]
            stats["quality"]["random_mean"] = rep["random"]["mean"]
    stats["timings"] = timings
    c = clustered
    tables = PlanTables(ids=emb.ids, clusters=c.members, cluster_padded=c.padded,
                        batches=batches.rows, batch_cluster=batches.cluster,
                        batch_padded=batches.padded, negatives=negatives, extra_files=extra)
    dataset = DatasetInfo(fingerprint=fingerprint, n_rows=emb.n_rows, dim=emb.dim,
                          paired=emb.paired,
                          id_type="int64" if emb.ids.dtype.kind in "iu" else "string",
                          source=emb.source)
    with stage_progress(progress, "write", 1):
        return write_plan(out, config=config, dataset=dataset,
                          counts=plan_counts(c, batches, graph, config), tables=tables,
                          stats=stats, plan_id=plan_id_for(fingerprint, config),
                          lineage=lineage)
