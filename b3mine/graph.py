"""Rank window -> sparse undirected graph of mutual hard negatives (B3).

Edge i -> j for every j in ranks [p, p+m) of row i (j != i). ``mutual`` keeps i - j only when
both directions exist (B3's official choice); ``symmetric`` keeps it when either does.

>>> import numpy as np
>>> window = np.array([[1, 2], [0, 2], [0, 1]])
>>> window_graph(window, mutual=True).nnz
6
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def window_graph(window: np.ndarray, *, mutual: bool = True) -> sp.csr_matrix:
    """Undirected, unweighted (data = 1), self-loop-free CSR graph over the window's rows."""
    n, width = window.shape
    src = np.repeat(np.arange(n, dtype=np.int64), width)
    dst = window.reshape(-1).astype(np.int64, copy=False)
    keep = (dst >= 0) & (dst != src) & (dst < n)  # -1 = no result; rows beyond n: paired targets
    directed = sp.csr_matrix(
        (np.ones(int(keep.sum()), dtype=np.int8), (src[keep], dst[keep])), shape=(n, n)
    )
    directed.sum_duplicates()
    directed.data[:] = 1
    both = directed.multiply(directed.T) if mutual else directed.maximum(directed.T)
    graph = sp.csr_matrix(both, dtype=np.int8)
    graph.eliminate_zeros()
    graph.data[:] = 1
    graph.sort_indices()
    return graph


def degree_stats(graph: sp.csr_matrix) -> dict[str, float]:
    """Edges and degree distribution, for the plan's manifest."""
    deg = np.diff(graph.indptr)
    return {
        "edges": int(graph.nnz // 2),
        "mean_degree": float(deg.mean()) if len(deg) else 0.0,
        "isolated": int((deg == 0).sum()),
    }
