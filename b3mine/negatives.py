"""Extra hard negatives per example (B3's HNPS and HNIPS) with a positive-aware filter.

HNPS (per cluster): count how often each row appears in the members' rank lists over ranks
[0, p+depth); add the members once; subtract 2 per appearance inside any member's top p (likely
false negatives); zero the members; keep positive counts; sample weighted by count. The official
code samples |C| x K_neg rows jointly for the cluster; we sample per member (without replacement)
so that the positive-aware filter can act per query. HNIPS: K_neg uniform draws from the
example's own ranks [p, p+depth).

The filter (NV-Retriever "TopK-PercPos") drops a candidate j of query i when
``score(q_i, t_j) > threshold * score(q_i, t_i)``. When fewer than K_neg candidates survive, the
survivors are repeated; -1 marks "no candidate at all".
"""
from __future__ import annotations

import numpy as np

from b3mine.config import NegativesConfig
from b3mine.neighbours import Neighbours, at_most, max_norm, pair_scores, score_error
from b3mine.progress import ProgressCallback, stage_progress


def positive_scores(queries: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Teacher score of each row's own target (its positive), float64 and bit-identical on
    every engine (`pair_scores`): the filter compares against it."""
    rows = np.arange(queries.shape[0])
    return pair_scores(queries, targets, rows, rows)


def _sample_rows(keys: np.ndarray, candidates: np.ndarray, k: int) -> np.ndarray:
    """Per row, the candidates with the k largest keys (-inf = ineligible), survivors cycled."""
    n, width = keys.shape
    out = np.full((n, k), -1, np.int64)
    if width == 0:
        return out
    order = np.argsort(-keys, axis=1, kind="stable")[:, :k]
    chosen = np.take_along_axis(candidates, order, axis=1)
    ok = np.isfinite(np.take_along_axis(keys, order, axis=1))
    n_ok = ok.sum(axis=1)
    full = n_ok == k  # (fewer than k columns can never fill a row)
    out[full] = chosen[full]  # the common case, without a Python loop over rows
    for i in np.flatnonzero((n_ok > 0) & ~full):  # cycle survivors to fill k slots
        good = chosen[i, ok[i]]
        out[i] = good[np.arange(k) % len(good)]
    return out


def _gumbel_keys(weights: np.ndarray, eligible: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gumbel-top-k keys: taking the k largest samples without replacement, weighted."""
    with np.errstate(divide="ignore"):
        keys = np.log(weights) + rng.gumbel(size=weights.shape)
    keys[~eligible | (weights <= 0)] = -np.inf
    return keys


def hnips(
    neighbours: Neighbours,
    queries: np.ndarray,
    targets: np.ndarray,
    pos: np.ndarray,
    p: int,
    config: NegativesConfig,
    rng: np.random.Generator,
) -> np.ndarray:
    """(N, K_neg) rows: uniform draws from each example's own ranks [p, p+depth)."""
    cand = neighbours.rows[:, p : p + config.depth]
    scores = neighbours.scores[:, p : p + config.depth]
    rows = np.arange(len(cand))
    eligible = (cand >= 0) & (cand != rows[:, None])
    if config.positive_filter is not None:
        # searched scores are within score_error of exact: decide near-threshold pairs exactly
        error = score_error(queries, max_norm(targets))
        bound = np.broadcast_to(config.positive_filter * pos[:, None], cand.shape)
        eligible &= at_most(scores, bound, error, queries, targets, rows, cand)
    keys = _gumbel_keys(np.ones(cand.shape), eligible, rng)
    return _sample_rows(keys, cand, config.k)


def hnps(
    neighbours: Neighbours,
    members: np.ndarray,
    queries: np.ndarray,
    targets: np.ndarray,
    pos: np.ndarray,
    p: int,
    config: NegativesConfig,
    rng: np.random.Generator,
    progress: ProgressCallback | None = None,
) -> np.ndarray:
    """(N, K_neg) rows for every member of ``members`` (C, K); rows in no cluster get -1."""
    return hnps_clusters(neighbours.rows, members, members, queries, targets, pos, p, config,
                         rng, progress)


def hnps_clusters(
    ranks: np.ndarray,
    local_members: np.ndarray,
    members: np.ndarray,
    queries: np.ndarray,
    targets: np.ndarray,
    pos: np.ndarray,
    p: int,
    config: NegativesConfig,
    rng: np.random.Generator,
    progress: ProgressCallback | None = None,
) -> np.ndarray:
    """HNPS over a subset of rows (one region; all rows for `hnps`): ``ranks``, ``queries`` and
    ``pos`` are indexed by local row, ``local_members`` (C, K) are the clusters in local rows and
    ``members`` the same in global rows (what candidates are compared with). Local rows must be
    ordered as the global ones. Returns (n_local, K_neg)."""
    out = np.full((queries.shape[0], config.k), -1, np.int64)
    depth = p + config.depth
    norm = max_norm(targets) if config.positive_filter is not None else 0.0
    with stage_progress(progress, "negatives", len(members)) as advance:
        for local, cluster in zip(local_members, members):
            # padded repeats share their original's negatives
            local, cluster = np.unique(local), np.unique(cluster)
            out[local] = _hnps_cluster(ranks[local, :depth], cluster, queries[local], targets,
                                       pos[local], p, config, rng, norm)
            advance()
    return out


def _hnps_cluster(lists: np.ndarray, cluster: np.ndarray, queries: np.ndarray,
                  targets: np.ndarray, pos: np.ndarray, p: int, config: NegativesConfig,
                  rng: np.random.Generator, norm: float = 0.0) -> np.ndarray:
    """One cluster's (|C|, K_neg) negatives from its members' rank lists (see module doc)."""
    valid = lists >= 0
    pool, counts = np.unique(lists[valid], return_counts=True)
    top_p = lists[:, :p]
    bad_pool, bad = np.unique(top_p[top_p >= 0], return_counts=True)
    weight = counts.astype(np.float64)
    weight[np.searchsorted(pool, bad_pool)] -= 2 * bad
    is_member = np.isin(pool, cluster)
    weight[is_member] = 0  # (the official "+1 per member" is zeroed right after)
    keep = weight > 0
    pool, weight = pool[keep], weight[keep]
    eligible = np.ones((len(cluster), len(pool)), bool)
    if config.positive_filter is not None and len(pool):
        s = queries @ targets[pool].T  # BLAS: exact only near the bound
        bound = np.broadcast_to(config.positive_filter * pos[:, None], s.shape)
        cand = np.broadcast_to(pool, s.shape)
        eligible = at_most(s, bound, score_error(queries, norm), queries, targets,
                           np.arange(len(queries)), cand)
    keys = _gumbel_keys(np.broadcast_to(weight, eligible.shape).copy(), eligible, rng)
    cand = np.broadcast_to(pool, eligible.shape)
    return _sample_rows(keys, cand, config.k)
