"""Region-parallel mining: cut the corpus into regions of at most S rows and mine each alone.

Position in the pipeline: neighbours -> **regions** -> per region (graph -> clusters ->
negatives) -> batches -> plan. The Dask engine (``pipelines/regions.py``) runs one task per
region; this module holds the algorithms, each a plain function of one region's arrays.

* **Regions.** Rows are first grouped into fine *cells*: the IVF coarse lists when the
  neighbour index is IVF (the fill tasks already assigned every row), otherwise a seeded
  k-means with ``CELLS_PER_REGION`` centroids per region. The *cell graph* has a node per cell
  weighing its rows and an edge weighing the window entries [p, p+m) between two cells.
  KaMinPar cuts it into ceil(N / S) blocks of at most S rows with the least window weight
  between blocks, so a region is a set of whole cells that point at each other: the cut is
  the share of window entries regions lose. A block still above S (a cell larger than S) is
  cut into near-equal chunks in (cell, row) order.
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
from scipy.sparse import coo_matrix, csr_matrix

from b3mine import clustering
from b3mine.config import MiningConfig
from b3mine.graph import window_graph
from b3mine.negatives import hnips, hnps_clusters
from b3mine.neighbours import Neighbours

__all__ = ["RegionLayout", "RegionResult", "cell_graph", "cell_pairs",
           "epoch_keys", "mine_region", "n_regions", "nearest_cell", "partition_cells",
           "train_centroids"]

CELLS_PER_REGION = 64  # k-means cells per region without IVF lists (benchmarks/regions.py)


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


def nearest_cell(x: np.ndarray, centroids: np.ndarray, block: int = 8192) -> np.ndarray:
    """Nearest centroid (inner product; ties: lower id) of each row, int32."""
    out = np.empty(len(x), np.int32)
    for a in range(0, len(x), block):
        out[a:a + block] = np.argmax(np.asarray(x[a:a + block], np.float32) @ centroids.T, axis=1)
    return out


def cell_pairs(cells: np.ndarray, window_cells: np.ndarray, n_cells: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Window entries of one block that join two different cells, counted per ordered pair:
    keys ``cell_i * n_cells + cell_j`` (ascending) and their counts. ``window_cells`` (n, m)
    holds the cell of each window entry, -1 for none."""
    src = np.broadcast_to(np.asarray(cells, np.int64)[:, None], window_cells.shape)
    keep = (window_cells >= 0) & (window_cells != src)
    return np.unique(src[keep] * n_cells + window_cells[keep], return_counts=True)


def cell_graph(keys: np.ndarray, counts: np.ndarray, n_cells: int) -> csr_matrix:
    """Symmetric cell graph: edge weight = window entries between the two cells, both ways."""
    g = coo_matrix((np.asarray(counts, np.int64), (keys // n_cells, keys % n_cells)),
                   shape=(n_cells, n_cells)).tocsr()
    return (g + g.T).tocsr()


def partition_cells(graph: csr_matrix, sizes: np.ndarray, region_size: int, seed: int,
                    tries: int = 4) -> np.ndarray:
    """Block of every cell: ceil(N / S) blocks of at most S rows (one more per try while the
    heaviest block is over S; a cell above S stays over, and `RegionLayout` chunks it), with
    the least window weight between blocks (KaMinPar, one thread: reproducible for a seed)."""
    sizes = np.asarray(sizes, np.int64)
    part = np.zeros(len(sizes), np.int64)
    used = np.flatnonzero(sizes)  # empty cells hold no rows: leave them out of the graph
    n_blocks = n_regions(int(sizes.sum()), region_size)
    if n_blocks <= 1 or len(used) <= 1:
        return part
    sub = graph[used][:, used].tocsr()
    for _ in range(tries):
        labels = clustering.kaminpar_partition(sub, [region_size] * n_blocks, seed,
                                               preset="default", vertex_weights=sizes[used])
        if np.bincount(labels, weights=sizes[used]).max() <= region_size:
            break
        n_blocks += 1
    part[used] = labels
    return part


@dataclass(frozen=True)
class RegionLayout:
    """Where the rows of each cell go: block ``part[c]``, then chunks of at most S rows of the
    block in (cell, row) order. ``prefix[c]``: rows of the block's cells with a smaller id."""

    part: np.ndarray  # (F,) block of each cell
    prefix: np.ndarray  # (F,)
    chunks: np.ndarray  # (P,) regions of each block (0 for an empty block)
    per_chunk: np.ndarray  # (P,) rows per chunk of each block

    @property
    def n_regions(self) -> int:
        return int(self.chunks.sum())

    @classmethod
    def of(cls, part: np.ndarray, sizes: np.ndarray, region_size: int) -> RegionLayout:
        sizes = np.asarray(sizes, np.int64)
        block_rows = np.bincount(part, weights=sizes).astype(np.int64)
        chunks = -(-block_rows // region_size)  # 0 for an empty block: it gets no region id
        per_chunk = -(-block_rows // np.maximum(chunks, 1))
        order = np.lexsort((np.arange(len(part)), part))
        before = np.cumsum(sizes[order]) - sizes[order]  # rows of earlier cells, all blocks
        start = np.cumsum(block_rows) - block_rows  # ... less those of earlier blocks
        prefix = np.empty(len(part), np.int64)
        prefix[order] = before - start[part[order]]
        return cls(part=part, prefix=prefix, chunks=chunks, per_chunk=per_chunk)

    def regions(self, cells: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """Final region of each row of one block (rows ascending); ``offsets`` (F,): rows of
        each cell in earlier blocks (needed only for cells of blocks cut into chunks)."""
        cells = np.asarray(cells, np.int64)
        order = np.argsort(cells, kind="stable")
        sorted_cells = cells[order]
        starts = np.r_[True, sorted_cells[1:] != sorted_cells[:-1]] if len(cells) else \
            np.zeros(0, bool)
        run_start = np.maximum.accumulate(np.where(starts, np.arange(len(cells)), 0))
        rank = np.empty(len(cells), np.int64)
        rank[order] = np.arange(len(cells)) - run_start
        block = self.part[cells]
        position = self.prefix[cells] + offsets[cells] + rank
        base = np.cumsum(self.chunks) - self.chunks  # first region id of each block
        return (base[block] + position // self.per_chunk[block]).astype(np.int32)


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
