"""Teacher rank lists: for each query row, the target rows in descending similarity.

Three searchers, all searched in blocks of queries so memory stays bounded:

* FAISS on CPU: ``flat`` (exact inner product), ``ivf`` and ``hnsw`` (approximate); with the
  optional ``faiss-gpu`` build and a GPU, IVF indexes are searched on the GPU;
* ``torch``: exact, plain torch (float32 GEMM + top-k per block) on CUDA; ``flat`` switches to it
  automatically when a GPU is present (``device="auto"``). It also runs on CPU in float32,
  which is how it is tested without a GPU.

Every searcher returns its lists in one canonical order (see `canonical_order`): the same
rows in the same order whatever the engine, block size or corpus sharding.

Inputs are expected L2-normalised when cosine similarity is meant (``MiningConfig.normalize``).

>>> import numpy as np
>>> x = np.eye(3, dtype=np.float32)
>>> search(x, x, k=1, config=NeighbourConfig()).rows[:, 0].tolist()
[0, 1, 2]
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from b3mine.config import NeighbourConfig
from b3mine.errors import InputError
from b3mine.progress import ProgressCallback, stage_progress


@dataclass(frozen=True)
class Neighbours:
    """Top-k target rows per query (``rows``, -1 where the index returned fewer) and scores."""

    rows: np.ndarray  # (N, k) int64
    scores: np.ndarray  # (N, k) float32

    @property
    def depth(self) -> int:
        return self.rows.shape[1]

    def window(self, p: int, m: int) -> np.ndarray:
        """Ranks [p, p+m) of every row (B3's graph edges before the mutual filter)."""
        return self.rows[:, p : p + m]


def search(
    queries: np.ndarray,
    targets: np.ndarray,
    k: int,
    config: NeighbourConfig,
    progress: ProgressCallback | None = None,
) -> Neighbours:
    """The k most similar targets of every query (inner product), best first."""
    if queries.shape[1] != targets.shape[1]:
        raise InputError("queries and targets differ in dimension",
                         expected=str(queries.shape[1]), got=str(targets.shape[1]))
    k = min(k, targets.shape[0])
    device = resolve_device(config.device)
    # Exact search on a GPU is a GEMM + top-k: plain torch, no faiss-gpu needed.
    if config.index == "torch" or (config.index == "flat" and device == "cuda"):
        return torch_search(queries, targets, k, config.block_size, device, progress)
    return faiss_search(queries, targets, k, config, progress)


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``."""
    if device != "auto":
        return device
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


# -- FAISS (CPU) -----------------------------------------------------------------------------

def _faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError("FAISS is needed for neighbour search: pip install 'b3mine[mining]'") \
            from exc
    return faiss


def trained_ivf(targets: np.ndarray, config: NeighbourConfig, seed: int = 0):
    """An empty IVF-Flat inner-product index trained on a seeded sample of ``targets`` (which
    may be memory-mapped: only the sample is read). Filling it with every row in order gives
    the index `build_index` returns, however the rows are split between ``add`` calls."""
    faiss = _faiss()
    n, d = targets.shape
    nlist = config.nlist or max(1, min(n // 39, int(4 * math.sqrt(n))))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    # k-means dominates IVF's cost at this scale: train on a sample, with few iterations
    index.cp.niter = config.kmeans_iters
    index.cp.seed = seed
    index.cp.max_points_per_centroid = config.train_per_list
    rng = np.random.default_rng(seed)
    size = config.train_per_list * nlist
    rows = slice(None) if n <= size else np.sort(rng.choice(n, size, replace=False))
    index.train(np.ascontiguousarray(targets[rows], dtype=np.float32))
    index.nprobe = min(config.nprobe, nlist)
    return index


def build_index(targets: np.ndarray, k: int, config: NeighbourConfig, seed: int = 0):
    """A FAISS inner-product index over ``targets`` of the kind ``config.index`` names."""
    faiss = _faiss()
    if config.threads:
        faiss.omp_set_num_threads(config.threads)
    d = targets.shape[1]
    xb = np.ascontiguousarray(targets, dtype=np.float32)
    if config.index == "flat":
        index = faiss.IndexFlatIP(d)
    elif config.index == "ivf":
        index = trained_ivf(xb, config, seed)
    elif config.index == "hnsw":
        index = faiss.IndexHNSWFlat(d, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = config.ef_construction
        index.hnsw.efSearch = max(config.ef_search, k)
    else:
        raise InputError(f"unknown index kind {config.index!r}", expected="flat, ivf or hnsw")
    index.add(xb)
    return index


def faiss_search(
    queries: np.ndarray,
    targets: np.ndarray,
    k: int,
    config: NeighbourConfig,
    progress: ProgressCallback | None = None,
) -> Neighbours:
    index = on_gpu_if_available(build_index(targets, k, config), resolve_device(config.device))
    return search_index(index, queries, k, config.block_size, progress, targets=targets)


def on_gpu_if_available(index, device: str):
    """The index moved to every GPU when the optional faiss-gpu build sees one. Only IVF gets
    here on a GPU (exact search takes the torch path; FAISS has no GPU HNSW). With faiss-cpu,
    or on CPU, the index is returned as it is."""
    faiss = _faiss()
    if (device != "cuda" or faiss.get_num_gpus() == 0
            or isinstance(index, faiss.IndexHNSW)):
        return index
    return faiss.index_cpu_to_all_gpus(index)


# -- one order, whatever the blocking -------------------------------------------------------
#
# A blocked GEMM rounds a score differently depending on the block's shape, so two engines, two
# block sizes or two corpus shardings can order near-equal scores differently, and exact
# duplicates tie. Rank lists are therefore put in one canonical order: descending by the score
# computed the same way everywhere (`pair_scores`), ties by ascending row. Only candidates whose
# searched score lies within twice the search's rounding bound of a neighbour's are rescored;
# scores further apart are already in that order. Exact searches fetch a few candidates past k
# and re-search the rare query whose k-th candidate is not clear of the last one fetched.

SEARCH_MARGIN = 16  # candidates past k that exact searches fetch (k // 8 more on top)
_PAIR_CHUNK = 1 << 16


def pair_scores(queries: np.ndarray, targets: np.ndarray, q_rows: np.ndarray,
                t_rows: np.ndarray) -> np.ndarray:
    """float64 ``queries[q_rows[i]] . targets[t_rows[i]]``, bit-identical wherever computed:
    float32 products are exact in float64 and numpy's pairwise sum over one contiguous row
    does not depend on the batch the row sits in (no BLAS, whose rounding does)."""
    out = np.empty(len(q_rows), np.float64)
    for a in range(0, len(q_rows), _PAIR_CHUNK):
        q = np.asarray(queries[q_rows[a : a + _PAIR_CHUNK]], dtype=np.float32)
        t = np.asarray(targets[t_rows[a : a + _PAIR_CHUNK]], dtype=np.float32)
        out[a : a + len(q)] = np.multiply(q, t, dtype=np.float64).sum(axis=1)
    return out


def max_norm(targets: np.ndarray) -> float:
    """Largest row norm (streamed: targets may be memory-mapped)."""
    best = 0.0
    for a in range(0, targets.shape[0], _PAIR_CHUNK):
        t = np.asarray(targets[a : a + _PAIR_CHUNK], dtype=np.float32)
        if len(t):
            best = max(best, float(np.einsum("ij,ij->i", t, t, dtype=np.float64).max()))
    return math.sqrt(best)


def score_error(queries: np.ndarray, target_norm: float) -> np.ndarray:
    """Per query, the largest |float32 dot - exact dot| the canonical order allows for:
    ``8 sqrt(d) u |q| max|t|`` (u = 2**-24). Float32 rounding errors of a d-term sum grow
    like sqrt(d) u (the worst case d u needs every rounding to go the same way); at d=384 this
    is 9.4e-6, against 5.1e-7 the largest error measured over 324k FAISS/BLAS scores."""
    q = np.asarray(queries, dtype=np.float32)
    qn = np.sqrt(np.einsum("ij,ij->i", q, q, dtype=np.float64))
    return 8.0 * math.sqrt(q.shape[1]) * 2.0**-24 * qn * target_norm + 1e-30


def canonical_order(queries: np.ndarray, targets: np.ndarray, q_rows: np.ndarray,
                    rows: np.ndarray, scores: np.ndarray, error: np.ndarray, k: int,
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first ``k`` of each query's candidates (``rows``, -1 = none, any order; ``scores``
    within ``error`` of exact) in canonical order, their scores, and per query whether the k-th
    is clear of the last candidate (else a target that is not a candidate might outrank it)."""
    n, width = rows.shape
    key = np.where(rows >= 0, scores.astype(np.float64), -np.inf)
    # Searchers return candidates by descending score: sort only the queries whose lists are
    # not strictly descending (equal scores must go by row), an exact no-op for the others.
    unsorted = np.flatnonzero(~np.all((key[:, :-1] > key[:, 1:]) | (rows[:, 1:] < 0), axis=1))
    if len(unsorted):
        rows, key = rows.copy(), key.copy()
        sub_rows, sub_key = rows[unsorted], key[unsorted]
        order = np.lexsort((sub_rows, -sub_key), axis=1)
        rows[unsorted] = np.take_along_axis(sub_rows, order, 1)
        key[unsorted] = np.take_along_axis(sub_key, order, 1)
    valid = rows >= 0
    with np.errstate(invalid="ignore"):  # -inf - -inf between missing results: not linked
        linked = (key[:, :-1] - key[:, 1:]) <= 2 * error[:, None]
    segment = np.concatenate([np.zeros((n, 1), np.int64), np.cumsum(~linked, axis=1)], axis=1)
    grouped = np.zeros((n, width), bool)
    grouped[:, 1:] |= linked
    grouped[:, :-1] |= linked
    kk = min(k, width)
    # segments that start at or past rank k are cut off whole: their order does not matter
    grouped &= valid & (segment <= segment[:, kk - 1 : kk] if kk else False)
    qi, ci = np.nonzero(grouped)
    out_scores = key.astype(np.float32)
    if len(qi):
        exact = pair_scores(queries, targets, q_rows[qi], rows[qi, ci])
        out_scores[qi, ci] = exact.astype(np.float32)
        # reorder within tie groups, only in the queries that have one
        touched = np.unique(qi)
        by_exact = np.zeros((len(touched), width), np.float64)
        by_exact[np.searchsorted(touched, qi), ci] = exact
        order = np.lexsort((rows[touched], -by_exact, segment[touched]), axis=1)
        rows = rows.copy() if not len(unsorted) else rows
        rows[touched] = np.take_along_axis(rows[touched], order, 1)
        out_scores[touched] = np.take_along_axis(out_scores[touched], order, 1)
    settled = (segment[:, kk - 1] != segment[:, -1]) | ~valid[:, -1] if kk else np.ones(n, bool)
    return rows[:, :k], out_scores[:, :k], settled


def at_most(approx: np.ndarray, bound: np.ndarray, error: np.ndarray, queries: np.ndarray,
            targets: np.ndarray, q_rows: np.ndarray, t_rows: np.ndarray) -> np.ndarray:
    """``exact score <= bound`` for (n, w) candidate pairs whose ``approx`` scores are within
    ``error`` (n,) of exact: only pairs that close to the bound are rescored (`pair_scores`)."""
    out = approx <= bound
    qi, ci = np.nonzero((np.abs(approx - bound) <= error[:, None]) & (t_rows >= 0))
    out[qi, ci] = pair_scores(queries, targets, q_rows[qi], t_rows[qi, ci]) <= bound[qi, ci]
    return out


# raw(block, width, q_rows) -> (scores, rows): one searcher's top ``width`` per query of
# ``block`` (rows ``q_rows`` of the queries), any order
RawSearch = Callable[[np.ndarray, int, np.ndarray], tuple[np.ndarray, np.ndarray]]


def ranked_search(raw: RawSearch, queries: np.ndarray, targets: np.ndarray, k: int, block_size: int,
                  *, exact: bool, progress: ProgressCallback | None = None,
                  stage: str = "neighbours", target_norm: float | None = None) -> Neighbours:
    """Search ``queries`` in blocks with ``raw(block, width, q_rows) -> (scores, rows)``; return the
    top ``k`` in canonical order. ``exact``: raw is an exhaustive search, so candidates are
    fetched past k and unsettled queries re-searched until the top k is provably complete."""
    n, n_targets = queries.shape[0], targets.shape[0]
    k = min(k, n_targets)
    width = min(n_targets, k + SEARCH_MARGIN + k // 8) if exact else k
    norm = max_norm(targets) if target_norm is None else target_norm
    rows = np.empty((n, k), dtype=np.int64)
    scores = np.empty((n, k), dtype=np.float32)
    starts = range(0, n, block_size)
    with stage_progress(progress, stage, len(starts)) as advance:
        for start in starts:
            block = np.ascontiguousarray(queries[start : start + block_size], dtype=np.float32)
            q_rows = np.arange(start, start + len(block))
            error = score_error(block, norm)
            s, i = raw(block, width, q_rows)
            r, sc, settled = canonical_order(queries, targets, q_rows, i.astype(np.int64), s,
                                             error, k)
            for j in np.flatnonzero(~settled) if exact and width < n_targets else ():
                wide = width
                while True:  # a tie group straddles the k-th rank: fetch more until clear
                    wide = min(n_targets, 2 * wide)
                    s2, i2 = raw(block[j : j + 1], wide, q_rows[j : j + 1])
                    r2, sc2, ok = canonical_order(queries, targets, q_rows[j : j + 1],
                                                  i2.astype(np.int64), s2, error[j : j + 1], k)
                    if ok[0] or wide == n_targets:
                        r[j], sc[j] = r2[0], sc2[0]
                        break
            rows[start : start + len(block)] = r
            scores[start : start + len(block)] = sc
            advance()
    return Neighbours(rows=rows, scores=scores)


def merge_ranked(queries: np.ndarray, targets: np.ndarray, q_rows: np.ndarray,
                 parts: list[Neighbours], k: int, target_norm: float) -> Neighbours:
    """Merge per-corpus-shard rank lists (each the canonical top-k of its shard, global rows)
    into the canonical top-k of the whole corpus: the same lists one search would give."""
    rows = np.concatenate([p.rows for p in parts], axis=1)
    scores = np.concatenate([p.scores for p in parts], axis=1)
    error = score_error(queries[q_rows], target_norm)
    r, s, _ = canonical_order(queries, targets, q_rows, rows, scores, error, k)
    if r.shape[1] < k:  # fewer targets than k in total
        pad = k - r.shape[1]
        r = np.pad(r, ((0, 0), (0, pad)), constant_values=-1)
        s = np.pad(s, ((0, 0), (0, pad)), constant_values=-np.inf)
    return Neighbours(rows=r, scores=s)


def probe_lists(index, vectors: np.ndarray) -> np.ndarray:
    """Each vector's ``index.nprobe`` nearest coarse lists of an IVF index, nearest first:
    the lists a search of it scans (the first is the list ``index.add`` puts it in)."""
    return index.quantizer.search(np.ascontiguousarray(vectors, dtype=np.float32),
                                  index.nprobe)[1]


def ivf_search_by_list(index, queries: np.ndarray, k: int, lists: np.ndarray | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """``index.search`` (an IVF index) with the queries visited in the order of their coarse
    lists: neighbouring queries scan the same lists while those are still in cache (2.2x faster
    on memory-mapped lists, 1.2x in memory, two processes at 1M: ``benchmarks/ivf_order.py``;
    the scan is memory-bound). Each query's
    results are its own, so they equal ``index.search``'s. ``lists``: the queries' top-nprobe
    coarse lists, when already known (`probe_lists`)."""
    from faiss.contrib.ivf_tools import search_preassigned

    if lists is None:
        lists = probe_lists(index, queries)
    order = np.lexsort(lists.T[::-1])  # by first list, then second, ...
    # an inner-product IVF-Flat scan does not use the coarse scores: search_preassigned's zeros
    scores, rows = search_preassigned(index, queries[order], k, lists[order])
    back = np.empty_like(order)
    back[order] = np.arange(len(order))
    return scores[back], rows[back]


def search_index(index, queries: np.ndarray, k: int, block_size: int,
                 progress: ProgressCallback | None = None, stage: str = "neighbours", *,
                 targets: np.ndarray, target_norm: float | None = None,
                 query_lists: np.ndarray | None = None) -> Neighbours:
    """Search a FAISS index over ``targets`` in blocks of ``block_size`` (also the unit of
    progress), in canonical order. Flat (exact) indexes get the completeness guarantee.
    ``query_lists``: an IVF index's coarse lists of each query (`probe_lists`), if known."""
    faiss = _faiss()
    exact = isinstance(index, faiss.IndexFlat)

    def raw(block: np.ndarray, width: int, q_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(index, faiss.IndexIVF):
            lists = None if query_lists is None else np.asarray(query_lists[q_rows])
            return ivf_search_by_list(index, block, width, lists)
        return index.search(block, width)

    return ranked_search(raw, queries, targets, k, block_size, exact=exact, progress=progress,
                         stage=stage, target_norm=target_norm)


# -- torch (GPU, or CPU for tests) ------------------------------------------------------------

def torch_search(
    queries: np.ndarray,
    targets: np.ndarray,
    k: int,
    block_size: int,
    device: str,
    progress: ProgressCallback | None = None,
    max_block_bytes: int = 2 << 30,
    target_norm: float | None = None,
) -> Neighbours:
    """Exact top-k by blocked float32 GEMM + ``torch.topk`` (TF32 off: the canonical order's
    error bound assumes float32 products), on CUDA or CPU.

    The query block is shrunk so one block's score matrix stays under ``max_block_bytes``.
    """
    try:
        import torch
    except ImportError as exc:
        raise ImportError("the torch neighbour path needs torch: pip install torch") from exc
    t = targets.shape[0]
    block = max(1, min(block_size, max_block_bytes // max(1, t * 4)))
    kt = torch.from_numpy(np.ascontiguousarray(targets, dtype=np.float32)).to(device)

    def raw(q: np.ndarray, width: int, _rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s, i = torch.topk(torch.from_numpy(q).to(device) @ kt.T, width, dim=1, largest=True,
                          sorted=False)
        return s.cpu().numpy(), i.cpu().numpy()

    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.inference_mode():
            return ranked_search(raw, queries, targets, k, block, exact=True, progress=progress,
                                 target_norm=target_norm)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
