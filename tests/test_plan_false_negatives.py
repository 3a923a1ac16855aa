"""Plan-side false-negative options: near-duplicate removal, in-batch similarity cap, mixed
batches and the random-to-hard curriculum (MiningConfig.near_duplicates / similarity_cap /
batch_mix / curriculum)."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from b3mine import MiningConfig, mine
from b3mine.batches import assemble_batches, cap_similarity, mix_rows, random_shares
from b3mine.embeddings import Embeddings
from b3mine.mining import make_batches, make_clusters, near_duplicate_rows
from b3mine.neighbours import search
from b3mine.plan import BatchPlan


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def emb() -> Embeddings:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(40, 16))
    q = _unit(centres[rng.integers(0, 40, 1024)] + 0.4 * rng.normal(size=(1024, 16)))
    q[1], q[3] = q[0], q[2]  # exact duplicate queries: rows 0-1 and 2-3
    t = _unit(q + 0.2 * rng.normal(size=q.shape))
    return Embeddings.from_arrays(np.arange(1024), q, t, source="synthetic")


def _epoch_rows_are_a_permutation(rows: np.ndarray, before: np.ndarray) -> bool:
    return all(np.array_equal(np.sort(rows[e].ravel()), np.sort(before[e].ravel()))
               for e in range(len(rows)))


def test_random_shares_ramp_down_to_the_mix():
    s = random_shares(2, 4, 0.25, 0.5)
    assert s.shape == (2, 4)
    assert s[0, 0] == 1.0 and np.all(np.diff(s.ravel()) <= 0) and np.all(s[1] == 0.25)
    assert not random_shares(3, 5, 0.0, 0.0).any()


def test_mix_rows_keeps_every_row_and_moves_the_share():
    members = np.arange(64).reshape(16, 4)
    b = assemble_batches(members, np.zeros_like(members, bool), batch_size=16, epochs=1, seed=0,
                         last_batch="drop")
    rows, cluster, padded = b.rows[0].copy(), b.cluster[0].copy(), b.padded[0].copy()
    mix_rows(rows, cluster, padded, np.full(4, 0.5), np.random.default_rng(1))
    assert np.array_equal(np.sort(rows.ravel()), np.arange(64))
    assert np.array_equal(cluster, rows // 4)  # cluster ids travel with their rows
    moved = (rows != b.rows[0]).sum(1)
    assert np.all(moved <= 8) and moved.sum() > 0
    mixed = assemble_batches(members, np.zeros_like(members, bool), batch_size=16, epochs=2,
                             seed=0, last_batch="drop", mix=1.0)
    assert _epoch_rows_are_a_permutation(mixed.rows, b.rows.repeat(2, 0))
    # share 1: batches are no longer whole clusters
    assert any(len(np.unique(r // 4)) > 4 for r in mixed.rows[0])


def test_cap_similarity_leaves_no_pair_above_the_cap(emb):
    cfg = MiningConfig(batch_size=64, cluster_size=16, p=5, m=30, epochs=2)
    nb = search(emb.queries, emb.target_matrix, cfg.rank_depth, cfg.neighbours)
    from b3mine.mining import build_graph

    graph = build_graph(nb, cfg)
    clusters = make_clusters(graph, cfg)
    hard = make_batches(clusters, cfg, graph)
    cap = 0.9
    capped, left = cap_similarity(hard, emb.queries, emb.target_matrix, cap, seed=0)
    assert _epoch_rows_are_a_permutation(capped.rows, hard.rows)

    def over(rows: np.ndarray) -> int:
        s = emb.queries[rows] @ emb.target_matrix[rows].T
        np.fill_diagonal(s, -1)
        return int((s > cap).sum())

    before = sum(over(r) for e in hard.rows for r in e)
    after = sum(over(r) for e in capped.rows for r in e)
    # every over-cap pair counted twice by `over` (both directions) is one conflict
    assert before > 20 and after <= before // 10 and left <= after
    # the config path gives the same batches
    via_config = make_batches(clusters, cfg.model_copy(update={"similarity_cap": cap}), graph,
                              emb)
    assert np.array_equal(via_config.rows, capped.rows)
    with pytest.raises(ValueError, match="similarity_cap"):
        make_batches(clusters, cfg.model_copy(update={"similarity_cap": cap}), graph)


def test_near_duplicates_are_left_out_of_the_plan(emb, tmp_path):
    cfg = MiningConfig(batch_size=64, cluster_size=16, p=5, m=30, near_duplicates=0.999)
    nb = search(emb.queries, emb.target_matrix, cfg.rank_depth, cfg.neighbours)
    dropped = near_duplicate_rows(emb, nb, cfg)
    assert {1, 3} <= set(dropped.tolist()) and not {0, 2} & set(dropped.tolist())
    plan = BatchPlan.open(tmp_path / mine(emb, cfg, tmp_path).plan_id)
    rows = plan.batch_rows(epoch=0).ravel()
    assert 1 not in rows and 3 not in rows and 0 in rows and 2 in rows
    assert plan.manifest.counts.remainder_dropped >= len(dropped)
    with pytest.raises(ValueError, match="near_duplicates"):
        make_clusters(sp.csr_matrix((4, 4)), cfg)
