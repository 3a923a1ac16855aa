"""Per-stage seconds and peak memory of the in-process mine, exact and approximate.

    python benchmarks/mining.py                      # N=100,000 d=384 on this machine
    python benchmarks/mining.py --n 1000000 --d 768 --indexes torch   # on a GPU machine

Prints one JSON line per run; the approximate runs add the recall of their rank window
[p, p+m) against the exact one (on a sample of rows when the exact run is skipped).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, measured, two_level_mixture, window_recall  # noqa: E402

from b3mine.config import MiningConfig, NeighbourConfig  # noqa: E402
from b3mine.embeddings import Embeddings  # noqa: E402
from b3mine.mining import (  # noqa: E402
    build_graph,
    compute_neighbours,
    finish_plan,
    make_batches,
    make_clusters,
    prepare,
)
from b3mine.neighbours import search  # noqa: E402


def run(emb: Embeddings, config: MiningConfig, out: Path, exact_window: np.ndarray | None,
        sample: np.ndarray) -> tuple[dict, np.ndarray]:
    rec = {"bench": "mining", "n": emb.n_rows, "d": emb.dim, "index": config.neighbours.index,
           "algorithm": config.algorithm, "batch_size": config.batch_size,
           "cluster_size": config.cluster_size, "p": config.p, "m": config.m,
           "threads": os.cpu_count()}
    start = time.perf_counter()
    with measured(rec, "total"):
        fingerprint = emb.fingerprint()
        emb = prepare(emb, config)
        with measured(rec, "neighbours"):
            nb = compute_neighbours(emb, config)
        with measured(rec, "graph"):
            graph = build_graph(nb, config)
        with measured(rec, "clusters"):
            clustered = make_clusters(graph, config)
        with measured(rec, "batches"):
            batches = make_batches(clustered, config, graph)
        with measured(rec, "report_write"):
            plan = finish_plan(emb, fingerprint, config, graph, clustered, batches, None, out)
    rec["total_s"] = round(time.perf_counter() - start, 2)
    window = nb.window(config.p, config.m)
    if exact_window is not None:
        rec["window_recall"] = round(window_recall(window[sample], exact_window[sample]), 4)
    rec["edges"] = int(graph.nnz // 2)
    q = plan.report()
    rec["hardness_ratio"] = round(q["mean_similarity_ratio"] or 0, 2)
    rec["plan_id"] = plan.plan_id
    return rec, window


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--indexes", default="ivf,hnsw,flat")
    ap.add_argument("--algorithm", default="metis")
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--recall-sample", type=int, default=2000)
    ap.add_argument("--out", default="bench-out/mining")
    args = ap.parse_args()

    x = two_level_mixture(args.n, args.d, seed=0)
    emb = Embeddings.from_arrays(np.arange(args.n), x)
    sample = np.random.default_rng(0).choice(args.n, min(args.recall_sample, args.n),
                                             replace=False)
    base = MiningConfig(batch_size=1024, cluster_size=32, p=30, m=100, algorithm=args.algorithm)
    # reference window for recall: exact search of the sampled rows only
    ref = search(x[sample], x, base.p + base.m, NeighbourConfig(index="flat"))
    exact_window = np.full((args.n, base.m), -1, np.int64)
    exact_window[sample] = ref.window(base.p, base.m)
    for index in args.indexes.split(","):
        cfg = base.model_copy(update={"neighbours": NeighbourConfig(
            index=index, nprobe=args.nprobe)})
        rec, _ = run(emb, cfg, Path(args.out), exact_window, sample)
        emit(rec)


if __name__ == "__main__":
    main()
