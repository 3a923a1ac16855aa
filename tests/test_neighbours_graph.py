"""Neighbour search (real FAISS, torch path) and the rank-window graph."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from b3mine.config import NeighbourConfig
from b3mine.graph import degree_stats, window_graph
from b3mine.neighbours import search
from tests.conftest import clustered_vectors


def brute_force(q: np.ndarray, t: np.ndarray, k: int) -> np.ndarray:
    s = q.astype(np.float64) @ t.T.astype(np.float64)
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return clustered_vectors(1500, 24, 30, seed=3)


def test_flat_is_exact_and_blocked(data):
    k = 40
    got = search(data, data, k, NeighbourConfig(index="flat", block_size=97))
    want = brute_force(data, data, k)
    # exact up to float32 ties: compare score-wise, then row sets
    assert (got.rows[:, 0] == np.arange(len(data))).all()  # self first
    assert np.mean([len(set(a) & set(b)) / k for a, b in zip(got.rows, want)]) > 0.999
    assert (np.diff(got.scores, axis=1) <= 1e-6).all()  # best first


def test_torch_path_matches_faiss_flat(data):
    pytest.importorskip("torch")
    k = 25
    a = search(data, data, k, NeighbourConfig(index="flat", device="cpu"))
    b = search(data, data, k, NeighbourConfig(index="torch", device="cpu", block_size=128))
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
    assert np.mean(a.rows == b.rows) > 0.999


@pytest.mark.parametrize("index,kw", [("ivf", {"nprobe": 8}), ("hnsw", {"ef_search": 64})])
def test_approximate_recall(data, index, kw):
    k = 30
    exact = brute_force(data, data, k)
    got = search(data, data, k, NeighbourConfig(index=index, **kw))
    recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(got.rows, exact)])
    assert recall > 0.9, recall


def test_paired_queries_against_targets(data):
    q, t = data[:700], data[700:1400]
    got = search(q, t, 10, NeighbourConfig())
    assert got.rows.max() < 700
    np.testing.assert_array_equal(got.rows, brute_force(q, t, 10))


def test_depth_clamped_to_corpus(data):
    got = search(data[:20], data[:20], 500, NeighbourConfig())
    assert got.rows.shape == (20, 20)


def test_dimension_mismatch_is_named(data):
    with pytest.raises(ValueError, match=r"differ in dimension \(expected 24, got 8\)"):
        search(data, data[:, :8], 5, NeighbourConfig())


def test_window_graph_mutual_and_symmetric():
    # 0->1, 0->2, 1->2, 2->0, 2->1, and a -1 padding slot
    window = np.array([[1, 2], [2, -1], [0, 1]])
    mutual = window_graph(window, mutual=True).toarray()
    sym = window_graph(window, mutual=False).toarray()
    assert mutual.tolist() == [[0, 0, 1], [0, 0, 1], [1, 1, 0]]
    assert sym.tolist() == [[0, 1, 1], [1, 0, 1], [1, 1, 0]]


def test_window_graph_properties_on_real_ranks(data):
    nb = search(data, data, 60, NeighbourConfig())
    g = window_graph(nb.window(5, 40), mutual=True)
    assert isinstance(g, sp.csr_matrix)
    assert (g != g.T).nnz == 0  # undirected
    assert g.diagonal().sum() == 0  # no self loops
    assert set(np.unique(g.data)) <= {1}
    # every mutual edge is inside both rows' windows
    w = nb.window(5, 40)
    i, j = g.nonzero()
    member = [j_ in set(w[i_]) and i_ in set(w[j_]) for i_, j_ in zip(i[:500], j[:500])]
    assert all(member)
    sym = window_graph(w, mutual=False)
    assert g.nnz < sym.nnz
    stats = degree_stats(g)
    assert stats["edges"] == g.nnz // 2


def test_index_stays_on_cpu_without_a_gpu(data):
    from b3mine.neighbours import build_index, on_gpu_if_available

    index = build_index(data, 5, NeighbourConfig(index="ivf"))
    assert on_gpu_if_available(index, "cpu") is index
    assert on_gpu_if_available(index, "cuda") is index  # faiss-cpu: get_num_gpus() == 0


def test_ivf_search_by_list_equals_faiss_search(data):
    """Visiting queries in coarse-list order changes the speed, never a query's results."""
    from b3mine.neighbours import build_index, ivf_search_by_list

    index = build_index(data, 20, NeighbourConfig(index="ivf", nlist=30, nprobe=3))
    queries = data[::-1][:500].copy()  # not in list order, so the visit order differs
    want_scores, want_rows = index.search(queries, 20)
    scores, rows = ivf_search_by_list(index, queries, 20)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_array_equal(scores, want_scores)
