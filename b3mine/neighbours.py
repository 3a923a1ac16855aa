"""Teacher rank lists: for each query row, the target rows in descending similarity.

Three searchers, all searched in blocks of queries so memory stays bounded:

* FAISS on CPU: ``flat`` (exact inner product), ``ivf`` and ``hnsw`` (approximate); with the
  optional ``faiss-gpu`` build and a GPU, IVF indexes are searched on the GPU;
* ``torch``: exact, plain torch (fp16 GEMM + top-k per block) on CUDA; ``flat`` switches to it
  automatically when a GPU is present (``device="auto"``). It also runs on CPU in float32,
  which is how it is tested without a GPU.

Inputs are expected L2-normalised when cosine similarity is meant (``MiningConfig.normalize``).

>>> import numpy as np
>>> x = np.eye(3, dtype=np.float32)
>>> search(x, x, k=1, config=NeighbourConfig()).rows[:, 0].tolist()
[0, 1, 2]
"""
from __future__ import annotations

import math
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


def build_index(targets: np.ndarray, k: int, config: NeighbourConfig, seed: int = 0):
    """A FAISS inner-product index over ``targets`` of the kind ``config.index`` names."""
    faiss = _faiss()
    if config.threads:
        faiss.omp_set_num_threads(config.threads)
    n, d = targets.shape
    xb = np.ascontiguousarray(targets, dtype=np.float32)
    if config.index == "flat":
        index = faiss.IndexFlatIP(d)
    elif config.index == "ivf":
        nlist = config.nlist or max(1, min(n // 39, int(4 * math.sqrt(n))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        # k-means dominates IVF's cost at this scale: train on a sample, with few iterations
        index.cp.niter = config.kmeans_iters
        index.cp.seed = seed
        index.cp.max_points_per_centroid = config.train_per_list
        rng = np.random.default_rng(seed)
        size = config.train_per_list * nlist
        sample = xb if n <= size else xb[np.sort(rng.choice(n, size, replace=False))]
        index.train(sample)
        index.nprobe = min(config.nprobe, nlist)
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
    return search_index(index, queries, k, config.block_size, progress)


def on_gpu_if_available(index, device: str):
    """The index moved to every GPU when the optional faiss-gpu build sees one. Only IVF gets
    here on a GPU (exact search takes the torch path; FAISS has no GPU HNSW). With faiss-cpu,
    or on CPU, the index is returned as it is."""
    faiss = _faiss()
    if (device != "cuda" or faiss.get_num_gpus() == 0
            or isinstance(index, faiss.IndexHNSW)):
        return index
    return faiss.index_cpu_to_all_gpus(index)


def search_index(index, queries: np.ndarray, k: int, block_size: int,
                 progress: ProgressCallback | None = None, stage: str = "neighbours",
                 ) -> Neighbours:
    """Search ``queries`` in blocks of ``block_size`` (also the unit of progress)."""
    n = queries.shape[0]
    rows = np.empty((n, k), dtype=np.int64)
    scores = np.empty((n, k), dtype=np.float32)
    starts = range(0, n, block_size)
    with stage_progress(progress, stage, len(starts)) as advance:
        for start in starts:
            block = np.ascontiguousarray(queries[start : start + block_size], dtype=np.float32)
            d, i = index.search(block, k)
            scores[start : start + len(block)] = d
            rows[start : start + len(block)] = i
            advance()
    return Neighbours(rows=rows, scores=scores)


# -- torch (GPU, or CPU for tests) ------------------------------------------------------------

def torch_search(
    queries: np.ndarray,
    targets: np.ndarray,
    k: int,
    block_size: int,
    device: str,
    progress: ProgressCallback | None = None,
    max_block_bytes: int = 2 << 30,
) -> Neighbours:
    """Exact top-k by blocked GEMM + ``torch.topk``: fp16 on CUDA (fp32 accumulate), fp32 on CPU.

    The query block is shrunk so one block's score matrix stays under ``max_block_bytes``.
    """
    try:
        import torch
    except ImportError as exc:
        raise ImportError("the torch neighbour path needs torch: pip install torch") from exc
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    n, t = queries.shape[0], targets.shape[0]
    elem = torch.finfo(dtype).bits // 8
    block = max(1, min(block_size, max_block_bytes // max(1, t * elem)))
    kt = torch.from_numpy(np.ascontiguousarray(targets, dtype=np.float32)).to(device, dtype)
    rows = np.empty((n, k), dtype=np.int64)
    scores = np.empty((n, k), dtype=np.float32)
    starts = range(0, n, block)
    with torch.inference_mode(), stage_progress(progress, "neighbours", len(starts)) as advance:
        for start in starts:
            q = torch.from_numpy(np.ascontiguousarray(queries[start : start + block],
                                                      dtype=np.float32)).to(device, dtype)
            s, i = torch.topk(q @ kt.T, k, dim=1, largest=True, sorted=True)
            scores[start : start + len(q)] = s.float().cpu().numpy()
            rows[start : start + len(q)] = i.cpu().numpy()
            advance()
    return Neighbours(rows=rows, scores=scores)

