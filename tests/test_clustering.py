"""Clustering stage: backends on real graphs, invariants of exact sizes, determinism."""
from __future__ import annotations

import random

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from b3mine.clustering import (
    Clusters,
    _require,
    cluster,
    exact_size,
    find_communities,
    split_oversized,
)
from b3mine.config import MiningConfig
from b3mine.errors import InputError

BACKENDS = ["metis", "kaminpar", "louvain", "igraph-louvain", "leiden"]
SEEDED = ["metis", "kaminpar", "igraph-louvain", "leiden", "louvain"]


def config(algorithm: str, k: int, remainder: str = "drop", seed: int = 0) -> MiningConfig:
    return MiningConfig(
        batch_size=k, cluster_size=k, algorithm=algorithm, remainder=remainder, seed=seed
    )


def symmetric(upper: sp.spmatrix) -> sp.csr_matrix:
    """Unweighted symmetric graph without self loops from any sparse/dense pattern."""
    pattern = sp.csr_matrix(upper)
    graph = sp.csr_matrix(((pattern + pattern.T) != 0).astype(np.float64))
    graph.setdiag(0)
    graph.eliminate_zeros()
    graph.data[:] = 1.0
    return graph


def random_graph(n: int, density: float, seed: int) -> sp.csr_matrix:
    if n == 0:
        return sp.csr_matrix((0, 0))
    return symmetric(sp.random(n, n, density=density, random_state=seed))


def planted(groups: int, size: int, p_in: float, p_out: float, seed: int) -> sp.csr_matrix:
    """Dense groups of ``size`` rows (rows shuffled), sparse noise between them."""
    rng = np.random.default_rng(seed)
    n = groups * size
    block = np.kron(np.eye(groups), np.ones((size, size)))
    dense = rng.random((n, n)) < np.where(block > 0, p_in, p_out)
    graph = symmetric(sp.csr_matrix(np.triu(dense, 1)))
    perm = rng.permutation(n)  # so group membership is not row order
    return sp.csr_matrix(graph[perm][:, perm]), np.argsort(perm).reshape(groups, size)


def knn_graph(n: int, topics: int, k: int, seed: int) -> tuple[sp.csr_matrix, np.ndarray]:
    """Symmetric kNN graph (exact, numpy) of a Gaussian mixture; returns graph and topics."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(topics, 16))
    topic = rng.integers(topics, size=n)
    points = centres[topic] + 0.7 * rng.normal(size=(n, 16))
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    sims = points @ points.T
    np.fill_diagonal(sims, -np.inf)
    nearest = np.argpartition(-sims, k, axis=1)[:, :k]
    rows = np.repeat(np.arange(n), k)
    return symmetric(sp.csr_matrix((np.ones(rows.size), (rows, nearest.ravel())), (n, n))), topic


def check_invariants(found: Clusters, n: int, k: int, remainder: str) -> None:
    members, padded, dropped = found.members, found.padded, found.dropped
    assert members.dtype == np.int64 and dropped.dtype == np.int64 and padded.dtype == bool
    assert members.ndim == 2 and members.shape[1] == k and padded.shape == members.shape
    assert ((members >= 0) & (members < n)).all()
    real = members[~padded]
    assert np.array_equal(np.sort(np.concatenate([real, dropped])), np.arange(n))
    assert np.isin(members[padded], real).all()  # padding repeats ids that exist and are used
    assert padded.any(axis=1).sum() <= 1  # only the last short chunk is padded
    if remainder == "fill":
        assert dropped.size == 0
    else:
        assert not padded.any() and dropped.size < k
    if n >= k:
        assert all(np.unique(row).size == k for row in members)  # no repeats inside a cluster


def recovered(found: Clusters, groups: np.ndarray) -> float:
    """Share of planted groups that are exactly one cluster."""
    clusters = {frozenset(row.tolist()) for row in found.members}
    return float(np.mean([frozenset(g.tolist()) in clusters for g in groups]))


# ---------------------------------------------------------------------------------- real graphs


@pytest.mark.parametrize("algorithm", BACKENDS)
def test_planted_groups_of_size_k_are_recovered(algorithm: str) -> None:
    graph, groups = planted(groups=12, size=16, p_in=0.6, p_out=0.01, seed=1)
    found = cluster(graph, config(algorithm, 16))
    check_invariants(found, graph.shape[0], 16, "drop")
    assert recovered(found, groups) >= 0.9


@pytest.mark.parametrize("algorithm", BACKENDS)
def test_knn_graph_clusters_are_purer_than_random(algorithm: str) -> None:
    graph, topic = knn_graph(n=640, topics=10, k=10, seed=2)
    found = cluster(graph, config(algorithm, 16))
    check_invariants(found, 640, 16, "drop")
    majority = np.array([np.bincount(topic[row]).argmax() for row in found.members])
    purity = (topic[found.members] == majority[:, None]).mean()
    assert purity >= 0.8  # random chunks of 16 over 10 topics: about 0.25


@pytest.mark.parametrize("algorithm", BACKENDS)
def test_isolated_rows_and_tiny_components_are_packed(algorithm: str) -> None:
    pairs = sp.block_diag([np.ones((2, 2)) - np.eye(2)] * 10)  # 20 rows in pairs
    graph = symmetric(sp.block_diag([pairs, sp.csr_matrix((13, 13))]))  # + 13 isolated rows
    found = cluster(graph, config(algorithm, 8, remainder="fill"))
    check_invariants(found, 33, 8, "fill")
    assert found.members.shape == (5, 8) and found.padded.sum() == 7
    # Pairs are packed whole: each pair shares a cluster.
    cluster_of = np.repeat(np.arange(5), 8)[~found.padded.ravel()]
    where = dict(zip(found.members[~found.padded].tolist(), cluster_of.tolist()))
    assert all(where[2 * i] == where[2 * i + 1] for i in range(10))


def test_communities_counts_backend_output_before_splitting() -> None:
    graph, _ = planted(groups=3, size=40, p_in=0.5, p_out=0.0, seed=3)
    found = cluster(graph, config("leiden", 8))
    assert found.communities == 3
    assert found.members.shape == (15, 8)


def test_leiden_resolution_is_used() -> None:
    graph, _ = planted(groups=4, size=10, p_in=0.3, p_out=0.02, seed=4)
    coarse = find_communities(graph, config("leiden", 8).model_copy(update={"resolution": 0.01}))
    fine = find_communities(graph, config("leiden", 8).model_copy(update={"resolution": 0.9}))
    assert np.unique(coarse).size < np.unique(fine).size


# ------------------------------------------------------------------------------- split_oversized


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 80),
    density=st.floats(0.0, 0.3),
    k=st.integers(1, 12),
    communities=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_split_oversized_never_leaves_a_community_above_k(
    n: int, density: float, k: int, communities: int, seed: int
) -> None:
    graph = random_graph(n, density, seed)
    labels = np.random.default_rng(seed).integers(communities, size=n)
    split = split_oversized(graph, labels, k, seed)
    assert split.shape == (n,) and split.dtype == np.int64
    if n:
        assert np.bincount(split).max() <= k
        # Splitting only refines: rows in one new community shared an old one.
        for label in np.unique(split):
            assert np.unique(labels[split == label]).size == 1


def test_split_oversized_cuts_whole_groups_out_of_one_community() -> None:
    graph, groups = planted(groups=6, size=16, p_in=0.7, p_out=0.005, seed=5)
    split = split_oversized(graph, np.zeros(graph.shape[0], np.int64), 16, seed=0)
    whole = [np.unique(split[g]).size == 1 for g in groups]
    assert np.mean(whole) >= 5 / 6


# ------------------------------------------------------------------------------ exact_size


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 70),
    density=st.floats(0.0, 0.3),
    k=st.integers(1, 10),
    communities=st.integers(1, 30),
    remainder=st.sampled_from(["drop", "fill"]),
    seed=st.integers(0, 2**16),
)
def test_exact_size_invariants_on_arbitrary_labels(
    n: int, density: float, k: int, communities: int, remainder: str, seed: int
) -> None:
    graph = random_graph(n, density, seed)
    labels = np.random.default_rng(seed).integers(communities, size=n)
    found = exact_size(graph, labels, k, remainder, np.random.default_rng(seed))
    check_invariants(found, n, k, remainder)
    assert found.members.shape[0] == (n // k if remainder == "drop" else -(-n // k))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(0, 60),
    density=st.floats(0.0, 0.4),
    k=st.integers(1, 9),
    algorithm=st.sampled_from(BACKENDS),
    remainder=st.sampled_from(["drop", "fill"]),
    seed=st.integers(0, 2**16),
)
def test_cluster_invariants_on_random_graphs(
    n: int, density: float, k: int, algorithm: str, remainder: str, seed: int
) -> None:
    graph = random_graph(n, density, seed)
    found = cluster(graph, config(algorithm, k, remainder, seed))
    check_invariants(found, n, k, remainder)


def test_whole_communities_keep_their_best_connected_members() -> None:
    # A 5-clique plus one pendant row attached to it, K=5: the pendant is the leftover.
    clique = np.ones((5, 5)) - np.eye(5)
    dense = np.zeros((6, 6))
    dense[:5, :5] = clique
    dense[5, 0] = dense[0, 5] = 1
    found = exact_size(symmetric(dense), np.zeros(6, np.int64), 5, "drop", np.random.default_rng(0))
    assert sorted(found.members[0].tolist()) == [0, 1, 2, 3, 4]
    assert found.dropped.tolist() == [5]


@pytest.mark.parametrize("remainder", ["drop", "fill"])
@pytest.mark.parametrize("n", [0, 1, 3, 7])
def test_fewer_rows_than_k(n: int, remainder: str) -> None:
    found = cluster(random_graph(n, 0.5, 0), config("metis", 8, remainder))
    check_invariants(found, n, 8, remainder)
    if remainder == "drop" or n == 0:
        assert found.members.shape == (0, 8) and found.dropped.size == n
    else:  # the only cluster: all n rows, then repeats of them flagged as padding
        assert found.members.shape == (1, 8) and found.padded.sum() == 8 - n
        assert not found.padded[0, :n].any()


def test_fill_pads_with_used_ids_not_positions() -> None:
    # B3 padded with randrange(len(chunk)), a position. Here pads must be ids used in other
    # clusters: flagged, never repeating a row of the short chunk itself.
    n, k = 1003, 10
    graph, labels = random_graph(n, 0.01, 7), np.zeros(n, np.int64)
    found = exact_size(graph, labels, k, "fill", np.random.default_rng(1))
    check_invariants(found, n, k, "fill")
    last = found.members[-1]
    pads = last[found.padded[-1]]
    assert pads.size == 7 and not np.isin(pads, last[~found.padded[-1]]).any()


def test_fill_padding_is_seeded_by_the_generator() -> None:
    graph = random_graph(50, 0.1, 3)
    labels = np.zeros(50, np.int64)
    runs = [exact_size(graph, labels, 8, "fill", np.random.default_rng(s)).members for s in (4, 4)]
    assert np.array_equal(*runs)


# -------------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("algorithm", SEEDED)
def test_same_seed_same_clusters(algorithm: str) -> None:
    graph, _ = knn_graph(n=400, topics=8, k=8, seed=6)
    first = cluster(graph, config(algorithm, 16, "fill", seed=11))
    second = cluster(graph, config(algorithm, 16, "fill", seed=11))
    assert np.array_equal(first.members, second.members)
    assert np.array_equal(first.padded, second.padded)
    assert first.communities == second.communities


def test_kaminpar_gives_exact_sizes_without_repair() -> None:
    # N a multiple of K: KaMinPar's blocks are capped at K, so every block is one cluster of
    # exactly K and exact_size has nothing to pack or drop.
    graph, _ = knn_graph(n=1024, topics=12, k=10, seed=4)
    labels = find_communities(graph, config("kaminpar", 32))
    assert np.bincount(labels).tolist() == [32] * 32
    found = cluster(graph, config("kaminpar", 32))
    check_invariants(found, 1024, 32, "drop")
    assert found.members.shape == (32, 32) and found.dropped.size == 0
    assert sorted(map(sorted, found.members.tolist())) == sorted(
        sorted(np.flatnonzero(labels == c).tolist()) for c in range(32))


def test_kaminpar_is_deterministic_across_processes_and_uses_the_seed() -> None:
    import subprocess
    import sys

    graph, _ = knn_graph(n=600, topics=8, k=10, seed=5)
    here = find_communities(graph, config("kaminpar", 16, seed=3))
    script = (
        "import sys, numpy as np, scipy.sparse as sp\n"
        "from b3mine.clustering import find_communities\n"
        "from b3mine.config import MiningConfig\n"
        "g = sp.load_npz(sys.argv[1])\n"
        "cfg = MiningConfig(batch_size=16, cluster_size=16, algorithm='kaminpar', seed=3)\n"
        "np.save(sys.argv[2], find_communities(sp.csr_matrix(g), cfg))\n"
    )
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        sp.save_npz(Path(tmp) / "g.npz", graph)
        subprocess.run([sys.executable, "-c", script, str(Path(tmp) / "g.npz"),
                        str(Path(tmp) / "labels.npy")], check=True)
        there = np.load(Path(tmp) / "labels.npy")
    assert np.array_equal(here, there)
    other = find_communities(graph, config("kaminpar", 16, seed=4))
    assert not np.array_equal(here, other)


def test_negative_seed_is_refused_by_the_config() -> None:
    with pytest.raises(ValueError, match="seed"):
        config("metis", 8, seed=-3)


def test_igraph_rng_is_restored_to_the_random_module() -> None:
    import igraph

    cluster(random_graph(30, 0.2, 0), config("leiden", 4, seed=3))
    draws = []
    for _ in range(2):
        random.seed(123)  # igraph's default generator is the `random` module
        draws.append(igraph.Graph.Erdos_Renyi(n=20, p=0.3).get_edgelist())
    assert draws[0] == draws[1]


# ------------------------------------------------------------------------------------ errors


def test_bad_inputs_raise_input_errors() -> None:
    with pytest.raises(InputError, match="square"):
        cluster(sp.csr_matrix((3, 4)), config("metis", 2))
    with pytest.raises(InputError, match="remainder"):
        graph, labels = random_graph(4, 0.5, 0), np.zeros(4, np.int64)
        exact_size(graph, labels, 2, "pad", np.random.default_rng(0))
    with pytest.raises(InputError, match="labels"):
        split_oversized(random_graph(4, 0.5, 0), np.zeros(3, np.int64), 2, 0)


def test_missing_backend_names_the_extra() -> None:
    with pytest.raises(ImportError, match=r"pip install b3mine\[mining\]"):
        _require("b3mine_no_such_module", "leiden")


def test_weighted_metis_file_and_block_caps(tmp_path) -> None:
    from b3mine.clustering import kaminpar_partition, write_metis

    # a path 0 -3- 1 -1- 2 -5- 3 and an isolated node 4; vertex weights 2, 1, 1, 2, 1
    graph = sp.csr_matrix(sp.coo_matrix(([3, 3, 1, 1, 5, 5], ([0, 1, 1, 2, 2, 3],
                                                               [1, 0, 2, 1, 3, 2])), (5, 5)))
    weights = np.array([2, 1, 1, 2, 1])
    write_metis(graph, str(tmp_path / "g"), weights)
    assert (tmp_path / "g").read_text().splitlines() == [
        "5 3 011", "2 2 3", "1 1 3 3 1", "1 2 1 4 5", "2 3 5", "1"]
    labels = kaminpar_partition(graph, [4, 4], seed=0, preset="default",
                                vertex_weights=weights)
    assert np.bincount(labels, weights=weights).max() <= 4
    assert labels[0] == labels[1] and labels[2] == labels[3] and labels[1] != labels[2]
