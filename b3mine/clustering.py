"""Clustering stage: kNN graph -> clusters of exactly K dataset rows.

Position in the pipeline: embeddings -> neighbours -> graph -> **clusters** -> batches -> plan.
Three steps, each usable on its own:

1. `find_communities`: a backend labels the graph, sizes unconstrained
   (``metis`` | ``kaminpar`` | ``louvain`` | ``igraph-louvain`` | ``leiden``).
2. `split_oversized`: METIS cuts every community larger than K into parts of K plus one
   remainder part, so coherent communities yield whole clusters.
3. `exact_size`: every cluster gets exactly K rows; small groups are packed together and the
   last short chunk is dropped or filled with flagged repeats (never B3's position-for-id bug).

>>> import numpy as np, scipy.sparse as sp
>>> from b3mine import MiningConfig
>>> clique = np.ones((4, 4)) - np.eye(4)
>>> graph = sp.csr_matrix(sp.block_diag([clique] * 3))        # three 4-cliques
>>> found = cluster(graph, MiningConfig(batch_size=8, cluster_size=4, algorithm="metis"))
>>> sorted(sorted(row) for row in found.members.tolist())
[[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
"""
from __future__ import annotations

import heapq
import importlib
import os
import random
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import ModuleType

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyarrow import csv
from scipy.sparse import csr_matrix, issparse, triu

from b3mine.config import MiningConfig
from b3mine.errors import InputError

__all__ = ["Clusters", "cluster", "exact_size", "find_communities", "kaminpar_partition",
           "split_oversized"]

# igraph and KaMinPar keep one process-wide RNG each; serialise seeded runs so that threads
# don't interleave draws.
_IGRAPH_RNG_LOCK = threading.Lock()
_KAMINPAR_RNG_LOCK = threading.Lock()
_METIS_MAX_SEED = 2**31 - 1


@dataclass(frozen=True, eq=False)  # arrays: compare fields with np.array_equal
class Clusters:
    """Clusters of exactly K rows.

    members: (C, K) int64 dataset rows.
    padded:  (C, K) bool, True where the "fill" policy repeated a row already used elsewhere.
    dropped: (n,) int64 rows in no cluster (policy "drop").
    community_sizes: sizes of the communities the backend found, before splitting to K.

    Every row appears exactly once among ``members[~padded]`` and ``dropped`` together.
    """

    members: np.ndarray
    padded: np.ndarray
    dropped: np.ndarray
    community_sizes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def communities(self) -> int:
        return len(self.community_sizes)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def cluster(graph: csr_matrix, config: MiningConfig) -> Clusters:
    """find_communities -> split_oversized -> exact_size, seeded by ``config.seed``.

    Deterministic for the same seed and graph: ``metis`` (METIS seed option), ``kaminpar``
    (``kaminpar.reseed``, one thread unless ``config.kaminpar_threads`` says more),
    ``igraph-louvain`` and ``leiden`` (igraph RNG seeded, then restored) and ``louvain``
    (python-louvain ``random_state``). Splitting is seeded METIS; the "fill" padding uses
    ``np.random.default_rng(config.seed % 2**32)``.

    >>> import scipy.sparse as sp
    >>> cfg = MiningConfig(batch_size=4, cluster_size=4, remainder="fill")
    >>> found = cluster(sp.csr_matrix((6, 6)), cfg)                 # six isolated rows
    >>> found.members.shape, int(found.padded.sum()), found.dropped.size
    ((2, 4), 2, 0)
    """
    labels = find_communities(graph, config)
    sizes = np.bincount(labels) if labels.size else np.zeros(0, np.int64)
    labels = split_oversized(graph, labels, config.cluster_size, config.seed)
    rng = np.random.default_rng(_seed32(config.seed))
    found = exact_size(graph, labels, config.cluster_size, config.remainder, rng)
    return Clusters(found.members, found.padded, found.dropped, sizes)


def find_communities(graph: csr_matrix, config: MiningConfig) -> np.ndarray:
    """Backend-specific labels (N,) int64, numbered 0..c-1; sizes unconstrained.

    ``metis`` cuts into N // K balanced parts (as in B3); ``kaminpar`` into ceil(N / K) parts of
    at most K rows each (KaMinPar, preset ``config.kaminpar_preset``); ``louvain`` is python-louvain
    (modularity, resolution 1; slow, kept for compatibility); ``igraph-louvain`` is igraph's
    multilevel Louvain (fast path); ``leiden`` is igraph Leiden with the CPM objective at
    ``config.resolution``. Isolated rows get communities of their own (METIS: any part).

    >>> import scipy.sparse as sp
    >>> graph = sp.csr_matrix(sp.block_diag([np.ones((3, 3)) - np.eye(3)] * 2))
    >>> find_communities(graph, MiningConfig(batch_size=3, cluster_size=3, algorithm="leiden"))
    array([0, 0, 0, 1, 1, 1])
    """
    graph = _check_graph(graph)
    if graph.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    backend = _BACKENDS[config.algorithm]
    return _compact(backend(graph, config))


def split_oversized(
    graph: csr_matrix, labels: np.ndarray, cluster_size: int, seed: int
) -> np.ndarray:
    """Split every community larger than K; return new labels (0..c-1), none larger than K.

    A community of q*K + r rows is cut by METIS into q parts of K and one part of r (target
    part weights), so its tight subgroups stay whole. METIS may overshoot by a row or two: the
    least-connected extras of an overfull part form a new part, split again if it exceeds K.

    >>> import scipy.sparse as sp
    >>> ring = sp.csr_matrix(sp.diags([1.0, 1.0], [1, -1], shape=(10, 10)))
    >>> np.bincount(split_oversized(ring, np.zeros(10, np.int64), 4, seed=0)).tolist()
    [4, 4, 2]
    """
    graph = _check_graph(graph)
    labels = _check_labels(labels, graph.shape[0])
    k = _check_k(cluster_size)
    out = labels.copy()
    next_label = int(out.max()) + 1 if out.size else 0
    scratch = np.full(graph.shape[0], -1, dtype=np.int64)
    for rows in _oversized_communities(labels, k):
        parts = _split_community(_induced(graph, rows, scratch), k, seed)
        # Part 0 keeps the old label; the others get fresh ones.
        out[rows] = np.where(parts == 0, out[rows[0]], next_label + parts - 1)
        next_label += int(parts.max())
    return _compact(out)


def exact_size(
    graph: csr_matrix,
    labels: np.ndarray,
    cluster_size: int,
    remainder: str,
    rng: np.random.Generator,
) -> Clusters:
    """Force every cluster to exactly K rows.

    B3's approach, improved: communities largest first; each gives size // K whole clusters of
    its best-connected members and its least-connected ``size % K`` rows form a leftover group.
    Leftover groups (small communities, isolated rows, the extras) are packed into bins of K,
    largest first, each into the open bin it has most edges to (else first fit). Partly filled
    bins are completed from the emptiest bins. The last short chunk follows ``remainder``:
    "drop" lists its rows in ``dropped``; "fill" pads it with random rows already used in other
    clusters (or repeats of its own rows when N < K), flagged in ``padded``.

    >>> import scipy.sparse as sp
    >>> rng = np.random.default_rng(0)
    >>> found = exact_size(sp.csr_matrix((5, 5)), np.arange(5), 2, "drop", rng)
    >>> found.members.shape, found.dropped.size
    ((2, 2), 1)
    """
    graph = _check_graph(graph)
    labels = _check_labels(labels, graph.shape[0])
    k = _check_k(cluster_size)
    if remainder not in ("drop", "fill"):
        raise InputError(
            "unknown remainder policy", expected="'drop' or 'fill'", got=repr(remainder)
        )
    whole, groups = _cut_whole_clusters(graph, labels, k)
    bins = _pack_groups(graph, groups, k)
    completed, short = _complete_bins(bins, k)
    members = np.concatenate([whole, completed]).reshape(-1, k)
    return _apply_remainder(members, short, k, remainder, rng)


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------


def _metis_backend(graph: csr_matrix, config: MiningConfig) -> np.ndarray:
    return _metis_parts(graph, graph.shape[0] // config.cluster_size, config.seed)


def _kaminpar_backend(graph: csr_matrix, config: MiningConfig) -> np.ndarray:
    """KaMinPar into ceil(N / K) blocks, each capped at K rows (so most blocks are exactly K)."""
    n, k = graph.shape[0], config.cluster_size
    nparts = -(-n // k)
    if nparts <= 1:
        return np.zeros(n, dtype=np.int64)
    return kaminpar_partition(graph, [k] * nparts, config.seed, threads=config.kaminpar_threads,
                              preset=config.kaminpar_preset)


def kaminpar_partition(graph: csr_matrix, max_block_weights: list[int], seed: int, *,
                       threads: int = 1, preset: str = "largek-fast",
                       vertex_weights: np.ndarray | None = None) -> np.ndarray:
    """KaMinPar block of every node, block b weighing at most ``max_block_weights[b]``.

    Nodes weigh 1 each, or ``vertex_weights`` (positive integers; then ``graph.data`` holds
    positive integer edge weights too). Its Python bindings read graphs from files only: the
    graph goes to a METIS text file in a temporary directory (``$TMPDIR``). One thread is
    reproducible for a seed; more are not (KaMinPar's parallel label propagation races).
    """
    kaminpar = _require("kaminpar", "kaminpar")
    with tempfile.TemporaryDirectory(prefix="b3mine-kaminpar-") as tmp:
        path = os.path.join(tmp, "graph.metis")
        write_metis(graph, path, vertex_weights)
        loaded = kaminpar.load_graph(path, kaminpar.GraphFileFormat.METIS)
    with _KAMINPAR_RNG_LOCK:
        kaminpar.reseed(_seed32(seed))
        solver = kaminpar.KaMinPar(threads, kaminpar.context_by_name(preset))
        parts = solver.compute_partition(loaded, [int(w) for w in max_block_weights])
    return np.asarray(parts, dtype=np.int64)


def write_metis(graph: csr_matrix, path: str, vertex_weights: np.ndarray | None = None
                ) -> None:
    """Write a symmetric graph in METIS text format: ``n m`` then, per node, its 1-based
    neighbours (an empty line for an isolated node). With ``vertex_weights`` the header ends in
    ``011`` and each line is the node's weight, then (neighbour, edge weight) pairs, the edge
    weights being ``graph.data`` as integers. Self loops and stored zeros are left out (the
    format has neither). Vectorised through Arrow's CSV writer: one text column, no header, no
    quoting."""
    n = graph.shape[0]
    row = np.repeat(np.arange(n), np.diff(graph.indptr))
    keep = (graph.indices != row) & (graph.data != 0)
    tokens = graph.indices[keep].astype(np.int64) + 1
    per_node = np.bincount(row[keep], minlength=n)
    header = f"{n} {tokens.size // 2}"
    if vertex_weights is not None:
        pairs = np.column_stack([tokens, graph.data[keep].astype(np.int64)]).reshape(-1)
        starts = 2 * (np.cumsum(per_node) - per_node)  # each line opens with the node's weight
        tokens = np.insert(pairs, starts, np.asarray(vertex_weights, np.int64))
        per_node, header = 2 * per_node + 1, header + " 011"
    indptr = np.concatenate([[0], np.cumsum(per_node)])
    words = pa.array(tokens).cast(pa.string())
    lines = pc.binary_join(pa.LargeListArray.from_arrays(pa.array(indptr), words), " ")
    with open(path, "wb") as f:
        f.write(f"{header}\n".encode())
        csv.write_csv(pa.table({"adjacency": lines}), f,
                      csv.WriteOptions(include_header=False, quoting_style="none"))


def _louvain_backend(graph: csr_matrix, config: MiningConfig) -> np.ndarray:
    nx = _require("networkx", "louvain")
    community_louvain = _require("community", "louvain")  # the python-louvain distribution
    nx_graph = nx.from_scipy_sparse_array(graph)
    partition = community_louvain.best_partition(nx_graph, random_state=_seed32(config.seed))
    return np.fromiter((partition[i] for i in range(graph.shape[0])), np.int64, graph.shape[0])


def _igraph_louvain_backend(graph: csr_matrix, config: MiningConfig) -> np.ndarray:
    with _seeded_igraph(config.seed, "igraph-louvain") as igraph:
        found = _to_igraph(igraph, graph).community_multilevel()
    return np.asarray(found.membership, dtype=np.int64)


def _leiden_backend(graph: csr_matrix, config: MiningConfig) -> np.ndarray:
    with _seeded_igraph(config.seed, "leiden") as igraph:
        found = _to_igraph(igraph, graph).community_leiden(
            objective_function="CPM", resolution=config.resolution
        )
    return np.asarray(found.membership, dtype=np.int64)


_BACKENDS: dict[str, Callable[[csr_matrix, MiningConfig], np.ndarray]] = {
    "metis": _metis_backend,
    "kaminpar": _kaminpar_backend,
    "louvain": _louvain_backend,
    "igraph-louvain": _igraph_louvain_backend,
    "leiden": _leiden_backend,
}


def _require(module: str, backend: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"the {backend!r} clustering backend needs the {module!r} module: "
            "pip install b3mine[mining]"
        ) from err


@contextmanager
def _seeded_igraph(seed: int, backend: str) -> Iterator[ModuleType]:
    """igraph with its global RNG seeded; igraph's default (the `random` module) restored after."""
    igraph = _require("igraph", backend)
    with _IGRAPH_RNG_LOCK:
        igraph.set_random_number_generator(random.Random(seed))
        try:
            yield igraph
        finally:
            igraph.set_random_number_generator(random)


def _to_igraph(igraph: ModuleType, graph: csr_matrix):  # -> igraph.Graph
    upper = triu(graph, k=1).tocoo()  # each undirected edge once
    edges = np.column_stack([upper.row, upper.col]).astype(np.int64)
    return igraph.Graph(n=graph.shape[0], edges=edges, directed=False)


def _metis_parts(
    graph: csr_matrix, nparts: int, seed: int, tpwgts: list[float] | None = None
) -> np.ndarray:
    """METIS labels into ``nparts`` parts (optionally with target weights)."""
    n = graph.shape[0]
    nparts = min(nparts, n)
    if nparts <= 1:
        return np.zeros(n, dtype=np.int64)
    pymetis = _require("pymetis", "metis")
    # int64 arrays are what pymetis passes to METIS without a copy.
    adjacency = pymetis.CSRAdjacency(graph.indptr.astype(np.int64), graph.indices.astype(np.int64))
    options = pymetis.Options(seed=seed % _METIS_MAX_SEED)
    result = pymetis.part_graph(nparts, adjacency=adjacency, tpwgts=tpwgts, options=options)
    return np.asarray(result.vertex_part, dtype=np.int64)


# --------------------------------------------------------------------------------------------
# Splitting
# --------------------------------------------------------------------------------------------


def _oversized_communities(labels: np.ndarray, k: int) -> Iterator[np.ndarray]:
    """Rows of each community larger than k, ascending."""
    order = np.argsort(labels, kind="stable")
    sizes = np.bincount(labels) if labels.size else np.zeros(0, np.int64)
    ends = np.cumsum(sizes)
    for label in np.flatnonzero(sizes > k):
        yield order[ends[label] - sizes[label] : ends[label]]


def _split_community(sub: csr_matrix, k: int, seed: int) -> np.ndarray:
    """Local part labels 0..p-1 for one community's subgraph, every part at most k."""
    size = sub.shape[0]
    whole, rest = divmod(size, k)
    weights = np.array([k] * whole + ([rest] if rest else []), dtype=np.float64) / size
    parts = _metis_parts(sub, weights.size, seed, tpwgts=weights.tolist())
    parts = _compact(parts)
    extras = _overflow(sub, parts, k)
    if extras.size:
        inner = _split_community(_induced(sub, extras), k, seed) if extras.size > k else 0
        parts[extras] = int(parts.max()) + 1 + inner
        parts = _compact(parts)
    return parts


def _overflow(sub: csr_matrix, parts: np.ndarray, k: int) -> np.ndarray:
    """Rows beyond k in overfull parts: each part's least-connected members."""
    degree = _internal_degree(sub, parts)
    # Within each part, best-connected first (ties: lower row first); rank >= k overflows.
    order = np.lexsort((np.arange(parts.size), -degree, parts))
    rank = _rank_within(parts[order])
    return np.sort(order[rank >= k])


# --------------------------------------------------------------------------------------------
# Exact sizes
# --------------------------------------------------------------------------------------------


def _cut_whole_clusters(
    graph: csr_matrix, labels: np.ndarray, k: int
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Whole clusters (flat, length C*k) and the leftover groups (< k rows each).

    Communities largest first (as B3); inside each, best-connected members first, so whole
    clusters take the core and the leftover group holds the least-connected rows.
    """
    sizes = np.bincount(labels) if labels.size else np.zeros(0, np.int64)
    degree = _internal_degree(graph, labels)
    rows = np.arange(labels.size)
    order = np.lexsort((rows, -degree, labels, -sizes[labels]))
    sorted_labels = labels[order]
    rank = _rank_within(sorted_labels)
    in_whole = rank < (sizes[sorted_labels] // k) * k
    leftover = order[~in_whole]
    boundaries = np.flatnonzero(np.diff(labels[leftover])) + 1
    groups = np.split(leftover, boundaries) if leftover.size else []
    return order[in_whole], groups


def _pack_groups(graph: csr_matrix, groups: list[np.ndarray], k: int) -> list[list[int]]:
    """Pack groups (< k rows each) into bins of at most k, largest group first.

    Each group goes to the open bin it shares the most edges with; without such a bin, to the
    first bin with room (first-fit decreasing); else to a new bin. Groups are never split here.
    """
    if not groups:
        return []
    groups = sorted(groups, key=len, reverse=True)  # stable: ties keep community order
    between = _group_adjacency(graph, groups)
    bin_of = np.full(len(groups), -1, dtype=np.int64)
    fill = np.zeros(len(groups), dtype=np.int64)  # at most one bin per group
    open_bins = _OpenBins(k)
    bins: list[list[int]] = []
    for g, rows in enumerate(groups):
        room = k - rows.size
        target = _most_connected_bin(between, g, bin_of, fill, room)
        if target < 0:
            target = open_bins.first_fit(fill, room)
        if target < 0:
            target = len(bins)
            bins.append([])
        bins[target].extend(rows.tolist())
        fill[target] += rows.size
        bin_of[g] = target
        open_bins.add(target, int(fill[target]))
    return bins


class _OpenBins:
    """Bins with room, bucketed by fill: first fit in O(K log B) instead of scanning all bins."""

    def __init__(self, k: int) -> None:
        self._by_fill: list[list[int]] = [[] for _ in range(k)]  # min-heaps of bin ids

    def add(self, bin_id: int, fill: int) -> None:
        if fill < len(self._by_fill):
            heapq.heappush(self._by_fill[fill], bin_id)

    def first_fit(self, fill: np.ndarray, room: int) -> int:
        """Lowest bin id whose fill is at most ``room``; -1 if none."""
        best = -1
        for level in range(min(room, len(self._by_fill) - 1) + 1):
            heap = self._by_fill[level]
            while heap and fill[heap[0]] != level:  # stale: the bin has grown since
                heapq.heappop(heap)
            if heap and (best < 0 or heap[0] < best):
                best = heap[0]
        return best


def _group_adjacency(graph: csr_matrix, groups: list[np.ndarray]) -> csr_matrix:
    """Edge counts between groups (G x G, CSR)."""
    rows = np.concatenate(groups)
    owner = np.repeat(np.arange(len(groups)), [g.size for g in groups])
    indicator = csr_matrix(
        (np.ones(rows.size), (np.arange(rows.size), owner)), shape=(rows.size, len(groups))
    )
    return (indicator.T @ _induced(graph, rows) @ indicator).tocsr()


def _most_connected_bin(
    between: csr_matrix, g: int, bin_of: np.ndarray, fill: np.ndarray, room: int
) -> int:
    """The bin with at most ``room`` rows that group g has the most edges to (ties: lowest id)."""
    start, end = between.indptr[g], between.indptr[g + 1]
    neighbour_bins = bin_of[between.indices[start:end]]
    placed = neighbour_bins >= 0
    if not placed.any():
        return -1
    candidates, where = np.unique(neighbour_bins[placed], return_inverse=True)
    edges = np.bincount(where, weights=between.data[start:end][placed])
    edges[fill[candidates] > room] = 0
    return int(candidates[np.argmax(edges)]) if edges.max() > 0 else -1


def _complete_bins(bins: list[list[int]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Fill the fullest bins from the emptiest ones; return (whole clusters flat, short chunk).

    Taking from the emptiest bins (singletons, small groups) keeps larger groups intact.
    """
    ordered = sorted(bins, key=len, reverse=True)
    done = [b for b in ordered if len(b) == k]
    pending = deque(b for b in ordered if len(b) < k)
    short: list[int] = []
    while pending:
        head = pending.popleft()
        while len(head) < k and pending:
            donor = pending[-1]
            take = min(k - len(head), len(donor))
            head.extend(donor[len(donor) - take :])
            del donor[len(donor) - take :]
            if not donor:
                pending.pop()
        if len(head) == k:
            done.append(head)
        else:
            short = head
    flat = np.array([row for b in done for row in b], dtype=np.int64)
    return flat, np.array(short, dtype=np.int64)


def _apply_remainder(
    members: np.ndarray, short: np.ndarray, k: int, remainder: str, rng: np.random.Generator
) -> Clusters:
    padded = np.zeros(members.shape, dtype=bool)
    if short.size == 0:
        return Clusters(members, padded, np.zeros(0, np.int64))
    if remainder == "drop":
        return Clusters(members, padded, np.sort(short))
    fill = _padding_rows(members.ravel(), short, k - short.size, rng)
    last = np.concatenate([short, fill])[None, :]
    flags = np.arange(k)[None, :] >= short.size
    return Clusters(
        np.concatenate([members, last]),
        np.concatenate([padded, flags]),
        np.zeros(0, np.int64),
    )


def _padding_rows(
    used: np.ndarray, short: np.ndarray, need: int, rng: np.random.Generator
) -> np.ndarray:
    """Random rows already used elsewhere; with no other cluster (N < K), the short chunk's own."""
    pool = used if used.size else short
    return rng.choice(pool, size=need, replace=need > pool.size).astype(np.int64)


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _induced(graph: csr_matrix, rows: np.ndarray, scratch: np.ndarray | None = None) -> csr_matrix:
    """Subgraph on ``rows`` (in that order), in time linear in their edges.

    ``graph[rows][:, rows]`` costs O(N) per call in scipy; over thousands of communities that
    dominates. ``scratch`` (N entries of -1, restored on return) avoids reallocating it.
    """
    if scratch is None:
        scratch = np.full(graph.shape[0], -1, dtype=np.int64)
    block = graph[rows]
    scratch[rows] = np.arange(rows.size)
    local = scratch[block.indices]
    scratch[rows] = -1
    keep = local >= 0
    row_of = np.repeat(np.arange(rows.size), np.diff(block.indptr))
    data = np.ones(int(keep.sum()), dtype=graph.dtype)
    return csr_matrix((data, (row_of[keep], local[keep])), shape=(rows.size, rows.size))


def _internal_degree(graph: csr_matrix, labels: np.ndarray) -> np.ndarray:
    """Edges from each row to rows with the same label."""
    n = graph.shape[0]
    rows = np.repeat(np.arange(n), np.diff(graph.indptr))
    same = labels[rows] == labels[graph.indices]
    return np.bincount(rows[same], minlength=n).astype(np.int64)


def _rank_within(sorted_labels: np.ndarray) -> np.ndarray:
    """Position of each element inside its run of equal labels (input sorted by label)."""
    n = sorted_labels.size
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.r_[True, sorted_labels[1:] != sorted_labels[:-1]]
    run_start = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
    return np.arange(n) - run_start


def _compact(labels: np.ndarray) -> np.ndarray:
    """Renumber labels to 0..c-1, preserving their order."""
    return np.unique(labels, return_inverse=True)[1].astype(np.int64).reshape(-1)


def _seed32(seed: int) -> int:
    """Map any int seed (MiningConfig allows negatives) into [0, 2**32): numpy/python-louvain."""
    return int(seed) % 2**32


def _check_graph(graph: csr_matrix) -> csr_matrix:
    if not issparse(graph) or graph.ndim != 2 or graph.shape[0] != graph.shape[1]:
        got = f"{type(graph).__name__} of shape {getattr(graph, 'shape', '?')}"
        raise InputError(
            "graph must be a square sparse matrix", expected="N x N csr_matrix", got=got
        )
    return graph if isinstance(graph, csr_matrix) else csr_matrix(graph)


def _check_labels(labels: np.ndarray, n: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,) or (n and labels.min() < 0):
        raise InputError(
            "labels must be one non-negative integer per graph row",
            expected=f"shape ({n},)",
            got=f"shape {labels.shape}",
        )
    return _compact(labels.astype(np.int64))


def _check_k(cluster_size: int) -> int:
    if int(cluster_size) < 1:
        raise InputError("cluster_size must be positive", got=str(cluster_size))
    return int(cluster_size)
