"""IVF search in query order (``index.search``) vs in coarse-list order
(``b3mine.neighbours.ivf_search_by_list``), one FAISS thread per process, in blocks of 8,192
queries as the Dask neighbour tasks run them, on the corpus of ``benchmarks/pipeline.py``.

    python benchmarks/ivf_order.py                      # N=1,000,000, d=128, nlist=4000, nprobe=4
    python benchmarks/ivf_order.py --procs 1            # one process alone

``--procs 2`` runs that many processes at once, each searching its own blocks: a 2-worker
LocalCluster's situation, where the processes share the memory bandwidth that the list scan
needs. Both list layouts are timed: in memory (the in-process engine) and merged into one
memory-mapped file (``faiss.contrib.ondisk``, what the Dask engine searches). One JSON line per
process (seconds per block for each order, and whether the results were identical), then a
summary line per layout.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit  # noqa: E402
from pipeline import generate  # noqa: E402

BLOCK = 8192


def _search_blocks(index_path: str, data_path: str, first: int, blocks: int, k: int,
                   queue) -> None:
    import faiss

    from b3mine.neighbours import ivf_search_by_list

    faiss.omp_set_num_threads(1)
    index = faiss.read_index(index_path)
    x = np.load(data_path, mmap_mode="r")
    plain, by_list, same = [], [], True
    for b in range(first, first + blocks):
        q = np.ascontiguousarray(x[b * BLOCK : (b + 1) * BLOCK])
        t = time.perf_counter()
        s1, i1 = index.search(q, k)
        plain.append(time.perf_counter() - t)
        t = time.perf_counter()
        s2, i2 = ivf_search_by_list(index, q, k)
        by_list.append(time.perf_counter() - t)
        same &= bool(np.array_equal(i1, i2) and np.array_equal(s1, s2))
    queue.put({"first_block": first, "blocks": blocks,
               "plain_s_per_block": round(float(np.median(plain)), 3),
               "by_list_s_per_block": round(float(np.median(by_list)), 3), "identical": same})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--nlist", type=int, default=4000)
    ap.add_argument("--nprobe", type=int, default=4)
    ap.add_argument("--k", type=int, default=130)
    ap.add_argument("--blocks", type=int, default=5, help="blocks of 8,192 per process")
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/b3mine-bench"))
    args = ap.parse_args()
    import faiss

    from b3mine.config import NeighbourConfig
    from b3mine.neighbours import trained_ivf

    args.dir.mkdir(parents=True, exist_ok=True)
    from b3mine.embeddings import load_embeddings

    # the corpus of benchmarks/pipeline.py (same file, generated once)
    corpus = generate(args.dir / f"synthetic2-{args.n}x{args.d}-t1000.parquet", args.n, args.d,
                      topics=1000)
    data_path = args.dir / f"ivf-order-{args.n}x{args.d}.npy"
    if not data_path.exists():
        np.save(data_path, load_embeddings(corpus, normalize=True).queries)
    x = np.load(data_path, mmap_mode="r")
    t = time.perf_counter()
    from faiss.contrib.ondisk import merge_ondisk

    index = trained_ivf(x, NeighbourConfig(index="ivf", nlist=args.nlist, nprobe=args.nprobe))
    empty = faiss.clone_index(index)
    index.add(np.ascontiguousarray(x))
    stem = args.dir / f"ivf-order-{args.n}x{args.d}-{args.nlist}"
    memory_path = f"{stem}-memory.faiss"
    faiss.write_index(index, memory_path)
    # the layout the Dask engine searches: lists merged into one file, memory-mapped
    merge_ondisk(empty, [memory_path], f"{stem}.ivfdata")
    disk_path = f"{stem}-ondisk.faiss"
    faiss.write_index(empty, disk_path)
    emit({"step": "index", "n": args.n, "d": args.d, "nlist": args.nlist,
          "nprobe": args.nprobe, "seconds": round(time.perf_counter() - t, 1)})
    del index, empty
    ctx = mp.get_context("spawn")
    stride = max(1, (args.n // BLOCK) // args.procs)
    for lists, index_path in (("memory", memory_path), ("ondisk", disk_path)):
        queue = ctx.Queue()
        procs = [ctx.Process(target=_search_blocks,
                             args=(index_path, str(data_path), j * stride, args.blocks, args.k,
                                   queue)) for j in range(args.procs)]
        for p in procs:
            p.start()
        results = [queue.get() for _ in procs]
        for p in procs:
            p.join()
        for r in sorted(results, key=lambda r: r["first_block"]):
            emit({"step": "search", "lists": lists, "procs": args.procs, **r})
        plain = float(np.mean([r["plain_s_per_block"] for r in results]))
        by_list = float(np.mean([r["by_list_s_per_block"] for r in results]))
        print(json.dumps({"step": "summary", "lists": lists, "procs": args.procs,
                          "block": BLOCK, "plain_s_per_block": round(plain, 3),
                          "by_list_s_per_block": round(by_list, 3),
                          "speedup": round(plain / by_list, 2),
                          "identical": all(r["identical"] for r in results)}), flush=True)


if __name__ == "__main__":
    main()
