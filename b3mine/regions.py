"""Region-parallel mining: cut the corpus into regions of at most S rows and mine each alone.

Position in the pipeline: neighbours -> **regions** -> per region (graph -> clusters ->
negatives) -> batches -> plan. The Dask engine (``pipelines/regions.py``) runs one task per
region; this module holds the algorithms, each a plain function of one region's arrays.

* **Regions.** A seeded k-means (FAISS) with ``ceil(N / S)`` centroids on a sample; every row
  goes to its nearest centroid. A coarse region larger than S is cut into ``ceil(size / S)``
  near-equal chunks after ordering its rows by their *second* nearest centroid (then by row),
  so each chunk keeps the rows that lean towards the same neighbouring region together.
* **Rule for neighbours in other regions.** A region's graph is the global window graph
  induced on its rows: edge i - j is kept only when i and j share a region and each is in the
  other's window [p, p+m) (the mutual test needs both rank lists, which the region holds).
  Window entries pointing into other regions are dropped and counted (``cross_region``).
  Extra negatives (HNPS/HNIPS) are drawn from the members' full rank lists, so they may come
  from any region.
* **Leftovers.** Each region cuts clusters of exactly K with remainder "drop"; the < K rows a
  region leaves over go to one last leftover region, mined the same way with the config's
  remainder policy, so at most one short cluster exists in the whole plan, as in global mining.
* **Batches.** Cluster c of epoch e gets the key ``splitmix64(seed, e, c)``; the epoch's order
  is the clusters sorted by key. Any task can compute which clusters fall into its key range
  and how many come before it without seeing the others' members, so batches are assembled
  in parallel and interleave regions at random, as B3's random grouping does globally.

>>> import numpy as np
>>> epoch_keys(seed=0, epoch=0, clusters=np.arange(3)).dtype
dtype('uint64')
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from b3mine import clustering
from b3mine.config import MiningConfig
from b3mine.graph import window_graph
from b3mine.negatives import hnips, hnps_clusters
from b3mine.neighbours import Neighbours

__all__ = ["RegionResult", "chunk_regions", "epoch_keys", "mine_region", "n_regions",
           "nearest_two", "train_centroids"]


def n_regions(n_rows: int, region_size: int) -> int:
    return max(1, math.ceil(n_rows / region_size))


def train_centroids(sample: np.ndarray, n_centroids: int, seed: int) -> np.ndarray:
    """(R, d) float32 k-means centroids (FAISS, spherical when the data is normalised)."""
    import faiss

    sample = np.ascontiguousarray(sample, dtype=np.float32)
    if n_centroids <= 1 or sample.shape[0] <= n_centroids:
        return np.ascontiguousarray(sample[:max(1, min(n_centroids, sample.shape[0]))])
    km = faiss.Kmeans(sample.shape[1], n_centroids, niter=20, seed=seed % 2**31,
                      max_points_per_centroid=sample.shape[0], verbose=False)
    km.train(sample)
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


def nearest_two(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest and second-nearest centroid (inner product; ties: lower id) of each row."""
    scores = np.asarray(x, np.float32) @ centroids.T
    if centroids.shape[0] == 1:
        zero = np.zeros(len(scores), np.int32)
        return zero, zero
    order = np.argsort(-scores, axis=1, kind="stable")[:, :2]
    return order[:, 0].astype(np.int32), order[:, 1].astype(np.int32)


def chunk_regions(pair_counts: np.ndarray, region_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Final regions from the (coarse, second) row counts summed over all blocks.

    Returns ``chunks`` (R,) sub-regions per coarse region and ``base`` (R,) the first final
    region id of each. Coarse region c of size s becomes ceil(s / S) chunks of ceil(s / chunks)
    rows (the last one smaller), in the order (second nearest centroid, row).
    """
    sizes = pair_counts.sum(axis=1)
    chunks = np.maximum(1, -(-sizes // region_size)).astype(np.int64)
    chunks[sizes == 0] = 0
    base = np.concatenate([[0], np.cumsum(chunks)[:-1]]).astype(np.int64)
    return chunks, base


def final_regions(first: np.ndarray, second: np.ndarray, offsets: np.ndarray,
                  sizes: np.ndarray, chunks: np.ndarray, base: np.ndarray) -> np.ndarray:
    """Final region of each row of one block.

    ``offsets`` (R, R): rows of each (coarse, second) pair that come before this block in the
    (coarse, second, row) order, i.e. pairs with a smaller second plus earlier blocks' rows of
    the same pair. Rows of a block are ascending, so the rank inside the pair is a running
    count in block order.
    """
    n_centroids = offsets.shape[0]
    key = first.astype(np.int64) * n_centroids + second
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    starts = np.r_[True, sorted_key[1:] != sorted_key[:-1]] if len(key) else np.zeros(0, bool)
    run_start = np.maximum.accumulate(np.where(starts, np.arange(len(key)), 0))
    rank = np.empty(len(key), np.int64)
    rank[order] = np.arange(len(key)) - run_start
    position = offsets.reshape(-1)[key] + rank
    per_chunk = -(-sizes[first] // np.maximum(chunks[first], 1))
    return (base[first] + position // per_chunk).astype(np.int32)


def pair_offsets(block_counts: list[np.ndarray]) -> list[np.ndarray]:
    """For every block, its (coarse, second) offsets for ``final_regions``."""
    total = np.sum(block_counts, axis=0)
    before_second = np.cumsum(total, axis=1) - total  # rows of the same coarse, smaller second
    out, running = [], np.zeros_like(total)
    for counts in block_counts:
        out.append(before_second + running)
        running = running + counts
    return out


@dataclass(frozen=True)
class RegionResult:
    """One region's clusters (global rows) and its leftover rows (< K, ascending)."""

    members: np.ndarray  # (C, K) int64
    padded: np.ndarray  # (C, K) bool
    leftover: np.ndarray  # (n,) int64 rows, positions into the region's arrays
    edges: int  # undirected edges of the region's graph
    cross_region: int  # window entries that pointed into other regions (dropped)
    communities: np.ndarray  # sizes the backend found


def region_graph(rows: np.ndarray, window: np.ndarray, mutual: bool):
    """Induced window graph on ``rows`` (ascending global ids); window holds global ids."""
    pos = np.searchsorted(rows, window).clip(0, max(len(rows) - 1, 0))
    inside = (window >= 0) & (rows[pos] == window) if len(rows) else np.zeros(window.shape, bool)
    local = np.where(inside, pos, -1)
    cross = int(((window >= 0) & ~inside).sum())
    return window_graph(local, mutual=mutual), cross


def mine_region(rows: np.ndarray, ranks: np.ndarray, config: MiningConfig, *,
                leftover_region: bool = False) -> RegionResult:
    """Graph and clusters of one region: ``rows`` ascending global ids, ``ranks`` their rank
    lists (global ids). Ordinary regions drop their < K leftover rows (they go to the leftover
    region); the leftover region applies ``config.remainder``."""
    graph, cross = region_graph(rows, ranks[:, config.p: config.p + config.m],
                                config.graph == "mutual")
    cfg = config if leftover_region else config.model_copy(update={"remainder": "drop"})
    found = clustering.cluster(graph, cfg)
    return RegionResult(members=rows[found.members], padded=found.padded,
                        leftover=found.dropped, edges=int(graph.nnz // 2),
                        cross_region=cross, communities=found.community_sizes)


def region_rng(seed: int, region: int) -> np.random.Generator:
    """The negatives stream of one region (region -1: the leftover region)."""
    return np.random.default_rng([seed, 0x4E6, 0x12E, region + 1])


def region_negatives(rows: np.ndarray, ranks: Neighbours, members: np.ndarray,
                     queries: np.ndarray, targets: np.ndarray, pos: np.ndarray,
                     config: MiningConfig, rng: np.random.Generator) -> np.ndarray:
    """(len(rows), K_neg) extra negatives (global rows, -1 = none) for one region's rows.

    ``ranks`` are the region's rank lists (local row order, global ids), ``members`` the
    region's clusters in global rows, ``queries``/``pos`` local, ``targets`` global.
    """
    neg = config.negatives
    if neg.mode == "hnips":
        return hnips(ranks, pos, config.p, neg, rng)
    local = np.searchsorted(rows, members)
    return hnps_clusters(ranks.rows, local, members, queries, targets, pos, config.p, neg, rng)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def epoch_keys(seed: int, epoch: int, clusters: np.ndarray) -> np.ndarray:
    """Random-order keys of clusters in one epoch: sorting by key permutes them."""
    with np.errstate(over="ignore"):
        salt = _splitmix64(np.array([seed * 1_000_003 + epoch], np.uint64))[0]
        return _splitmix64(np.asarray(clusters, np.uint64) ^ salt)
