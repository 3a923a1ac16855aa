"""How many window entries regions keep: k-means cells per region vs the IVF lists as cells.

    python benchmarks/regions.py                                   # N=1,000,000, 1,000 topics
    python benchmarks/regions.py --n 4000000 --topics 4000 --nprobe 2 --cells-per-region 32 64

Region-parallel mining (``b3mine.regions``) groups rows into cells, counts the rank-window
entries [p, p+m) between cells and lets KaMinPar cut the cell graph into blocks of at most S
rows. This measures, on one set of rank lists, the share of window entries that stay inside a
region for each cell source: k-means with C cells per region (``CELLS_PER_REGION`` is 64; used
without an IVF index), and the IVF coarse lists (what the Dask engine uses with IVF). The rank
lists come from an IVF index (nlist 4 sqrt(N)) built once and cached next to the corpus; the
corpus is ``benchmarks/pipeline.py``'s. One JSON line per cell source.
"""
from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline import emit, generate

BLOCK = 65_536


def rank_windows(x: np.ndarray, p: int, m: int, nprobe: int, cache: Path
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(N, m) window [p, p+m) of each row (IVF search) and each row's IVF list."""
    import faiss

    if not cache.with_suffix(".lists.npy").exists():
        n, d = x.shape
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, int(4 * math.sqrt(n)),
                                   faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        index.train(x[np.sort(rng.choice(n, min(n, 40 * index.nlist), replace=False))])
        index.add(x)
        index.nprobe = nprobe
        window = np.lib.format.open_memmap(cache, "w+", np.int32, (n, m))
        lists = np.empty(n, np.int32)
        for a in range(0, n, BLOCK):
            window[a:a + BLOCK] = index.search(x[a:a + BLOCK], p + m)[1][:, p:]
            lists[a:a + BLOCK] = index.quantizer.search(x[a:a + BLOCK], 1)[1][:, 0]
        window.flush()
        np.save(cache.with_suffix(".lists.npy"), lists)
    return np.load(cache, mmap_mode="r"), np.load(cache.with_suffix(".lists.npy"))


def regions_from_cells(cell: np.ndarray, window: np.ndarray, n_cells: int, region_size: int,
                       seed: int) -> np.ndarray:
    """Final region of every row, as the Dask engine's regions stage computes it."""
    from b3mine import regions as core

    keys, counts = [], []
    for a in range(0, len(cell), BLOCK):
        w = np.asarray(window[a:a + BLOCK])
        k, c = core.cell_pairs(cell[a:a + BLOCK], np.where(w >= 0, cell[np.maximum(w, 0)], -1),
                               n_cells)
        keys.append(k)
        counts.append(c)
    graph = core.cell_graph(np.concatenate(keys), np.concatenate(counts), n_cells)
    sizes = np.bincount(cell, minlength=n_cells)
    layout = core.RegionLayout.of(core.partition_cells(graph, sizes, region_size, seed), sizes,
                                  region_size)
    return layout.regions(cell, np.zeros(n_cells, np.int64))  # one block: no earlier rows


def kept(region: np.ndarray, window: np.ndarray) -> float:
    inside = total = 0
    for a in range(0, len(region), BLOCK):
        w = np.asarray(window[a:a + BLOCK])
        ok = w >= 0
        inside += int(((region[np.maximum(w, 0)] == region[a:a + BLOCK, None]) & ok).sum())
        total += int(ok.sum())
    return inside / max(total, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--topics", type=int, default=1000)
    ap.add_argument("--p", type=int, default=30)
    ap.add_argument("--m", type=int, default=100)
    ap.add_argument("--nprobe", type=int, default=4)
    ap.add_argument("--region-size", type=int, default=131_072)
    ap.add_argument("--cells-per-region", type=int, nargs="+", default=[8, 32, 64, 128])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "b3mine-bench")
    args = ap.parse_args()

    from b3mine import regions as core
    from b3mine.embeddings import load_embeddings

    args.data_dir.mkdir(parents=True, exist_ok=True)
    name = f"synthetic2-{args.n}x{args.d}-t{args.topics}"
    x = load_embeddings(generate(args.data_dir / f"{name}.parquet", args.n, args.d, args.topics),
                        normalize=True).queries
    t0 = time.perf_counter()
    window, lists = rank_windows(x, args.p, args.m, args.nprobe,
                                 args.data_dir / f"{name}-p{args.p}m{args.m}n{args.nprobe}.npy")
    emit(step="ranks", n=args.n, topics=args.topics, nprobe=args.nprobe,
         seconds=round(time.perf_counter() - t0, 1))
    n_regions = core.n_regions(args.n, args.region_size)
    rng = np.random.default_rng([args.seed, 0x12E])
    for cells_per_region in args.cells_per_region:
        t0 = time.perf_counter()
        n_cells = cells_per_region * n_regions
        sample = x[np.sort(rng.choice(args.n, min(args.n, 64 * n_cells), replace=False))]
        cell = core.nearest_cell(x, core.train_centroids(sample, n_cells, args.seed))
        assign_s = time.perf_counter() - t0
        region = regions_from_cells(cell, window, n_cells, args.region_size, args.seed)
        emit(step="cells", source="k-means", cells_per_region=cells_per_region, cells=n_cells,
             regions=int(region.max() + 1), largest=int(np.bincount(region).max()),
             window_entries_kept=round(kept(region, window), 4),
             assign_s=round(assign_s, 1), seconds=round(time.perf_counter() - t0, 1))
    t0 = time.perf_counter()
    n_cells = int(lists.max() + 1)
    region = regions_from_cells(lists, window, n_cells, args.region_size, args.seed)
    emit(step="cells", source="ivf-lists", cells_per_region=round(n_cells / n_regions, 1),
         cells=n_cells, regions=int(region.max() + 1), largest=int(np.bincount(region).max()),
         window_entries_kept=round(kept(region, window), 4),
         seconds=round(time.perf_counter() - t0, 1))


if __name__ == "__main__":
    main()
