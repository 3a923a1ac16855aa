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
from scipy.sparse.csgraph import connected_components

from b3mine import clustering, storage
from b3mine.batches import Batches, assemble_batches, cap_similarity, cluster_affinity
from b3mine.config import EmbeddingSource, MiningConfig
from b3mine.embeddings import Embeddings, load_embeddings
from b3mine.errors import InputError
from b3mine.graph import degree_stats, window_graph
from b3mine.negatives import hnips, hnps, positive_scores
from b3mine.neighbours import Neighbours, search
from b3mine.plan import (
    BatchPlan,
    DatasetInfo,
    MixtureInfo,
    PlanCounts,
    PlanLineage,
    PlanTables,
    check_output_dir,
    plan_id_for,
    write_plan,
)
from b3mine.progress import ProgressCallback, stage_progress
from b3mine.report import quality_report, report_json, report_png


# -- stages ----------------------------------------------------------------------------------

def prepare(emb: Embeddings, config: MiningConfig) -> Embeddings:
    config.check_fits(emb.n_rows, emb.source)
    return emb.normalized() if config.normalize else emb


def compute_neighbours(emb: Embeddings, config: MiningConfig,
                       progress: ProgressCallback | None = None) -> Neighbours:
    return search(emb.queries, emb.target_matrix, config.rank_depth, config.neighbours, progress)


def build_graph(neighbours: Neighbours, config: MiningConfig) -> sp.csr_matrix:
    return window_graph(neighbours.window(config.p, config.m), mutual=config.graph == "mutual")


def near_duplicate_rows(emb: Embeddings, neighbours: Neighbours, config: MiningConfig
                        ) -> np.ndarray:
    """Rows to leave out under ``config.near_duplicates`` (sorted; empty when it is None).

    Candidates are each query's top ``max(p, 10)`` teacher ranks; two rows are near-duplicates
    when their queries or their targets have cosine >= the threshold. Each connected group
    keeps its lowest row."""
    thr = config.near_duplicates
    if thr is None:
        return np.zeros(0, np.int64)
    n = emb.n_rows
    cand = neighbours.rows[:, : max(config.p, 10)]
    i = np.repeat(np.arange(n), cand.shape[1])
    j = cand.reshape(-1)
    ok = (j >= 0) & (j != i)
    i, j = i[ok], j[ok]
    q, t = emb.queries, emb.target_matrix
    sim = np.maximum(np.einsum("nd,nd->n", q[i], q[j]), np.einsum("nd,nd->n", t[i], t[j]))
    dup = sim >= thr
    links = sp.csr_matrix((np.ones(int(dup.sum()), np.int8), (i[dup], j[dup])), shape=(n, n))
    _, label = connected_components(links, directed=False)
    first = np.full(label.max() + 1, n, np.int64)
    np.minimum.at(first, label, np.arange(n))
    return np.flatnonzero(first[label] != np.arange(n))


def make_clusters(graph: sp.csr_matrix, config: MiningConfig,
                  exclude: np.ndarray | None = None) -> clustering.Clusters:
    """Clusters of the graph; rows in ``exclude`` (near-duplicates) are in none, listed as
    dropped."""
    if config.near_duplicates is not None and exclude is None:
        raise ValueError("near_duplicates needs the rows to exclude (near_duplicate_rows); "
                         "this engine does not compute them: leave near_duplicates unset")
    if exclude is None or not len(exclude):
        return clustering.cluster(graph, config)
    keep = np.setdiff1d(np.arange(graph.shape[0]), exclude)
    found = clustering.cluster(graph[keep][:, keep].tocsr(), config)
    return clustering.Clusters(keep[found.members], found.padded,
                               np.sort(np.concatenate([keep[found.dropped], exclude])),
                               found.community_sizes)


def make_batches(clusters: clustering.Clusters, config: MiningConfig,
                 graph: sp.csr_matrix | None = None, emb: Embeddings | None = None) -> Batches:
    affinity = None
    if config.batch_grouping == "affinity":
        if graph is None:
            raise ValueError("batch_grouping='affinity' needs the graph")
        affinity = cluster_affinity(graph, clusters.members)
    batches = assemble_batches(clusters.members, clusters.padded, batch_size=config.batch_size,
                               epochs=config.epochs, seed=config.seed,
                               last_batch=config.last_batch, affinity=affinity,
                               mix=config.batch_mix, curriculum=config.curriculum)
    if config.similarity_cap is not None:
        if emb is None:
            raise ValueError("similarity_cap needs the embeddings; this engine does not pass "
                             "them: leave similarity_cap unset")
        batches, _ = cap_similarity(batches, emb.queries, emb.target_matrix,
                                    config.similarity_cap, config.seed)
    return batches


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
            return hnips(neighbours, emb.queries, emb.target_matrix, pos, config.p, neg, rng)
    return hnps(neighbours, clusters.members, emb.queries, emb.target_matrix, pos, config.p, neg,
                rng, progress)


def plan_counts(clusters: clustering.Clusters, batches: Batches,
                graph: sp.csr_matrix | dict[str, Any], config: MiningConfig) -> PlanCounts:
    n_clusters, k = clusters.members.shape
    slots = batches.batches_per_epoch * config.clusters_per_batch
    return PlanCounts(
        n_clusters=n_clusters,
        cluster_size=k,
        batch_size=config.batch_size,
        epochs=config.epochs,
        batches_per_epoch=batches.batches_per_epoch,
        # distinct examples differ per epoch when "drop" leaves out different clusters
        examples_per_epoch=[int(p.size - np.count_nonzero(p)) for p in batches.padded],
        remainder_dropped=len(clusters.dropped),
        remainder_padded=int(clusters.padded.sum()),
        last_batch_padded=max(0, slots - n_clusters) * k,
        n_edges=int(_graph_stats(graph)["edges"]),
        extra_negatives=config.negatives.k if config.negatives.mode != "none" else 0,
    )


def _graph_stats(graph: sp.csr_matrix | dict[str, Any]) -> dict[str, Any]:
    """Degree statistics of the graph, or the summary a region-parallel run already made."""
    return degree_stats(graph) if sp.issparse(graph) else dict(graph)


# -- the job ---------------------------------------------------------------------------------

@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[stage] = round(time.perf_counter() - start, 3)


def mine(
    embeddings: Embeddings | EmbeddingSource | str | Path,
    config: MiningConfig | dict[str, Any] | None = None,
    out: str | Path = "plans",
    *,
    progress: ProgressCallback | None = None,
    report: bool = True,
    lineage: PlanLineage | None = None,
) -> BatchPlan:
    """Mine a batch plan and write it atomically under ``out/<plan_id>``.

    The plan id is a content hash of the embeddings and the config: mining the same inputs again
    returns the existing plan without recomputing it. ``config`` may be a dict of its fields.
    The output directory is checked first, before any mining.
    """
    config = MiningConfig.of(config)
    if config.region_size is not None:
        raise InputError("region_size (region-parallel mining) runs on the Dask engine only: "
                         "use --engine dask / pipelines.run_job, or leave region_size unset")
    out, publish_to = storage.local_output(out)  # an fsspec URL: stage locally, publish after
    out = check_output_dir(out)
    timings: dict[str, float] = {}
    with _timed(timings, "load"), stage_progress(progress, "load", 1):
        raw = embeddings if isinstance(embeddings, Embeddings) else load_embeddings(
            storage.local_source(embeddings))
        fingerprint = raw.fingerprint()
    plan_id = plan_id_for(fingerprint, config)
    existing = out / plan_id
    if (existing / "manifest.json").is_file():
        if publish_to:  # (a no-op when it is published already)
            storage.publish_plan(existing, publish_to)
        return BatchPlan.open(existing)
    if publish_to and (url := storage.remote_plan(publish_to, plan_id)):
        return BatchPlan.open(url)  # mined elsewhere: a verified local copy
    emb = prepare(raw, config)
    with _timed(timings, "neighbours"):
        neighbours = compute_neighbours(emb, config, progress)
    with _timed(timings, "graph"), stage_progress(progress, "graph", 1):
        graph = build_graph(neighbours, config)
    with _timed(timings, "clusters"), stage_progress(progress, "clusters", 1):
        clustered = make_clusters(graph, config, near_duplicate_rows(emb, neighbours, config))
    with _timed(timings, "batches"), stage_progress(progress, "batches", 1):
        batches = make_batches(clustered, config, graph, emb)
    with _timed(timings, "negatives"):
        negatives = make_negatives(emb, neighbours, clustered, config, progress)
    plan = finish_plan(emb, fingerprint, config, graph, clustered, batches, negatives, out,
                       timings=timings, progress=progress, report=report, lineage=lineage)
    if publish_to:
        storage.publish_plan(plan.path, publish_to)
    return plan


def finish_plan(
    emb: Embeddings,
    fingerprint: str,
    config: MiningConfig,
    graph: sp.csr_matrix | dict[str, Any],
    clustered: clustering.Clusters,
    batches: Batches,
    negatives: np.ndarray | None,
    out: str | Path,
    *,
    timings: dict[str, float] | None = None,
    progress: ProgressCallback | None = None,
    report: bool = True,
    skipped_stages: list[str] | None = None,
    mixture: MixtureInfo | None = None,
    dataset_names: np.ndarray | None = None,
    random_rows: np.ndarray | None = None,
    lineage: PlanLineage | None = None,
) -> BatchPlan:
    """Report, assemble and atomically write the plan (the last stage of every engine).

    ``timings``: seconds of the stages run now; ``skipped_stages``: stages whose results an
    engine that checkpoints (Dask) took from an earlier, interrupted run of the same job.
    ``graph`` is the window graph, or (region-parallel runs, which never build it whole) its
    ``degree_stats`` summary plus any extra fields to record under ``stats["graph"]``.
    ``mixture``, ``dataset_names`` (the dataset of each row) and ``random_rows`` (the report's
    baseline batches): from `b3mine.mixture`, for plans over several datasets.
    """
    timings = dict(timings or {})
    stats: dict[str, Any] = {"graph": _graph_stats(graph), "communities_found":
                             clustered.communities}
    extra: dict[str, bytes] = {}
    if report and batches.rows.size:
        with _timed(timings, "report"), stage_progress(progress, "report", 1):
            rep = quality_report(emb.queries, emb.target_matrix, batches.rows[0],
                                 clustered.community_sizes, seed=config.seed,
                                 random_rows=random_rows)
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
    if skipped_stages:
        stats["skipped_stages"] = list(skipped_stages)
    c = clustered
    tables = PlanTables(ids=emb.ids, clusters=c.members, cluster_padded=c.padded,
                        batches=batches.rows, batch_cluster=batches.cluster,
                        batch_padded=batches.padded, negatives=negatives, extra_files=extra,
                        dataset_names=dataset_names)
    dataset = DatasetInfo(fingerprint=fingerprint, n_rows=emb.n_rows, dim=emb.dim,
                          paired=emb.paired,
                          id_type="int64" if emb.ids.dtype.kind in "iu" else "string",
                          source=emb.source)
    with stage_progress(progress, "write", 1):
        return write_plan(out, config=config, dataset=dataset,
                          counts=plan_counts(c, batches, graph, config), tables=tables,
                          stats=stats, plan_id=plan_id_for(fingerprint, config), mixture=mixture,
                          lineage=lineage)
