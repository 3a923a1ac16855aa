"""Compare the clustering backends on a synthetic clustered kNN graph; one JSON line each.

Data: a two-level Gaussian mixture in d=64 (coarse topics, fine topics inside them, points around
a fine topic), L2-normalised; graph: the k nearest neighbours by inner product (faiss
IndexFlatIP, exact), made symmetric (i-j if either lists the other) or mutual (both do).

Per backend: seconds (find_communities, then split+exact_size), communities found and their
sizes, clusters after exact_size, dropped rows, mean cosine between distinct members of a
cluster ("hardness"), purity (share of rows whose cluster's majority fine topic is their own),
and the share of graph edges kept inside clusters (1 - edge cut). A "random" line gives the
chunked random permutation baseline.

    python benchmarks/clustering.py                 # N=20000, K=32, k=20, symmetric
    python benchmarks/clustering.py --n 5000 --algorithms metis leiden
    python benchmarks/clustering.py --n 200000 --graph mutual --algorithms metis kaminpar \
        --kaminpar-presets largek-fast largek default
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
from scipy.sparse import csr_matrix

from b3mine.clustering import Clusters, exact_size, find_communities, split_oversized
from b3mine.config import MiningConfig

ALGORITHMS = ("metis", "kaminpar", "igraph-louvain", "leiden", "louvain")


def mixture(
    n: int, dim: int, coarse: int, fine_size: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Normalised points and their fine-topic ids (about ``fine_size`` points per fine topic)."""
    rng = np.random.default_rng(seed)
    n_fine = max(1, n // fine_size)
    centres = rng.normal(size=(coarse, dim))
    fine = centres[rng.integers(coarse, size=n_fine)] + 0.6 * rng.normal(size=(n_fine, dim))
    topic = rng.integers(n_fine, size=n)
    points = fine[topic] + 0.8 * rng.normal(size=(n, dim))
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    return points.astype(np.float32), topic


def knn_graph(points: np.ndarray, k: int, mode: str) -> csr_matrix:
    """Unweighted k-NN graph without self loops: symmetric (either side) or mutual (both)."""
    import faiss

    index = faiss.IndexFlatIP(points.shape[1])
    index.add(points)
    _, found = index.search(points, k + 1)
    n = points.shape[0]
    rows = np.repeat(np.arange(n), k + 1)
    cols = found.ravel()
    keep = (cols >= 0) & (cols != rows)
    directed = csr_matrix((np.ones(keep.sum(), np.float32), (rows[keep], cols[keep])), shape=(n, n))
    graph = directed.maximum(directed.T) if mode == "symmetric" else directed.minimum(directed.T)
    graph = csr_matrix(graph)
    graph.data[:] = 1.0
    graph.eliminate_zeros()
    return graph


def quality(points: np.ndarray, topic: np.ndarray, graph: csr_matrix, found: Clusters) -> dict:
    """Hardness (mean within-cluster cosine of distinct real rows), purity, edges kept inside."""
    members, real = found.members, ~found.padded
    if members.size == 0:
        return {"cos": None, "purity": None, "edges_inside": None}
    vectors = points[members] * real[..., None]
    sums = vectors.sum(axis=1)
    count = real.sum(axis=1)
    pairs = count * (count - 1)
    inside = (np.einsum("cd,cd->c", sums, sums) - count) / np.maximum(pairs, 1)  # unit rows
    topics = topic[members]
    majority = np.array([np.bincount(t[r]).argmax() for t, r in zip(topics, real)])
    pure = ((topics == majority[:, None]) & real).sum() / real.sum()
    label = np.full(points.shape[0], -1)
    label[members[real]] = np.repeat(np.arange(members.shape[0]), count)
    coo = graph.tocoo()
    same = (label[coo.row] == label[coo.col]) & (label[coo.row] >= 0)
    return {
        "cos": round(float(np.average(inside, weights=pairs)), 4),
        "purity": round(float(pure), 4),
        "edges_inside": round(float(same.mean()) if same.size else 0.0, 4),
    }


def run_backend(graph: csr_matrix, config: MiningConfig) -> tuple[Clusters, dict]:
    start = time.perf_counter()
    labels = find_communities(graph, config)
    found_s = time.perf_counter() - start
    sizes = np.bincount(labels)
    start = time.perf_counter()
    split = split_oversized(graph, labels, config.cluster_size, config.seed)
    clusters = exact_size(
        graph, split, config.cluster_size, config.remainder, np.random.default_rng(config.seed)
    )
    sizing_s = time.perf_counter() - start
    real = (~clusters.padded).sum(axis=1)
    return clusters, {
        "find_s": round(found_s, 2),
        "split_exact_s": round(sizing_s, 2),
        "communities": int(sizes.size),
        "community_sizes_min_median_max": [
            int(sizes.min()), int(np.median(sizes)), int(sizes.max())
        ],
        "singletons": int((sizes == 1).sum()),
        "clusters": int(clusters.members.shape[0]),
        "cluster_real_size_min_max": [int(real.min()), int(real.max())] if real.size else None,
        "dropped": int(clusters.dropped.size),
        "padded": int(clusters.padded.sum()),
    }


def random_baseline(n: int, k: int, seed: int) -> Clusters:
    rows = np.random.default_rng(seed).permutation(n)
    whole = (n // k) * k
    members = rows[:whole].reshape(-1, k)
    return Clusters(members, np.zeros(members.shape, bool), np.sort(rows[whole:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--k", type=int, default=20, help="nearest neighbours per point")
    parser.add_argument("--graph", choices=("symmetric", "mutual"), default="symmetric")
    parser.add_argument("--cluster-size", type=int, default=32)
    parser.add_argument("--resolution", type=float, default=0.05)
    parser.add_argument("--remainder", choices=("drop", "fill"), default="drop")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--algorithms", nargs="+", choices=ALGORITHMS, default=list(ALGORITHMS))
    parser.add_argument("--kaminpar-presets", nargs="+", default=["largek-fast"],
                        help="one kaminpar line per preset")
    args = parser.parse_args()

    points, topic = mixture(args.n, args.dim, coarse=20, fine_size=50, seed=args.seed)
    start = time.perf_counter()
    graph = knn_graph(points, args.k, args.graph)
    common = {"n": args.n, "K": args.cluster_size, "knn": args.k, "graph": args.graph}
    seconds = round(time.perf_counter() - start, 2)
    print(json.dumps({**common, "step": "knn_graph", "seconds": seconds,
                      "edges": int(graph.nnz // 2)}), flush=True)
    baseline = random_baseline(args.n, args.cluster_size, args.seed)
    print(json.dumps({**common, "algorithm": "random", **quality(points, topic, graph, baseline)}),
          flush=True)
    for algorithm in args.algorithms:
        presets = args.kaminpar_presets if algorithm == "kaminpar" else [None]
        for preset in presets:
            extra = {"kaminpar_preset": preset} if preset else {}
            config = MiningConfig(
                batch_size=args.cluster_size, cluster_size=args.cluster_size, algorithm=algorithm,
                resolution=args.resolution, remainder=args.remainder, seed=args.seed, **extra,
            )
            clusters, stats = run_backend(graph, config)
            print(json.dumps({**common, "algorithm": algorithm, **extra, **stats,
                              **quality(points, topic, graph, clusters)}), flush=True)


if __name__ == "__main__":
    main()
