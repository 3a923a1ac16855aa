"""End-to-end mining benchmark: the Dask engine on a LocalCluster (global or region-parallel)
vs the in-process engine.

    python benchmarks/pipeline.py                       # N=1,000,000, d=128, IVF, 2 workers
    python benchmarks/pipeline.py --n 100000 --engines dask,local
    python benchmarks/pipeline.py --n 2000000 --engines dask-regions --region-size 131072

1. Synthetic clustered embeddings (two-level Gaussian mixture: ``--topics`` x 20 subtopics) are
   written once to Parquet in row groups of 65,536 (``--data-dir``, reused by later runs).
2. The IVF ``nprobe`` is tuned on a sample of queries: the smallest of 2, 4, ..., 256 whose
   rank-window recall (ranks [p, p+m) of IVF vs exact flat search, as sets) is >= 0.95.
3. Each engine runs in its own subprocess; this process samples the memory of that process tree
   (RSS summed over processes, and PSS, which counts shared memory-mapped pages once) every
   0.25 s (PSS every second): the tree's total, and the largest single process other than
   the client (a Dask worker); also each worker's anonymous memory (``RssAnon``: its heap,
   without the page cache of memory-mapped inputs and index lists). One JSON line per step;
   the last line compares the engines.
   ``dask-regions`` is the Dask engine with ``MiningConfig.region_size`` (``--region-size``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROW_GROUP = 65_536


def emit(**record: object) -> None:
    print(json.dumps(record), flush=True)


def generate(path: Path, n: int, d: int, topics: int, seed: int = 0) -> Path:
    """Write N clustered unit vectors to Parquet, one row group at a time (bounded memory)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    # Two levels, like real embedding corpora (low intrinsic dimension): topics, 20 subtopics
    # per topic, and small isotropic noise.
    centres = rng.normal(size=(topics, d)).astype(np.float32)
    sub = (np.repeat(centres, 20, axis=0)
           + 0.5 * rng.normal(size=(topics * 20, d)).astype(np.float32))
    tmp = path.with_suffix(".tmp")
    schema = pa.schema([("id", pa.int64()), ("embedding", pa.list_(pa.float32(), d))])
    with pq.ParquetWriter(tmp, schema) as writer:
        for start in range(0, n, ROW_GROUP):
            m = min(ROW_GROUP, n - start)
            x = sub[rng.integers(0, len(sub), m)] + 0.3 * rng.normal(size=(m, d)).astype(
                np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            emb = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), d)
            writer.write_table(pa.table({"id": np.arange(start, start + m), "embedding": emb},
                                        schema=schema), row_group_size=ROW_GROUP)
    os.replace(tmp, path)
    return path


def tune_nprobe(path: Path, p: int, m: int, sample: int, target: float = 0.95) -> dict:
    """Smallest nprobe whose rank-window recall on ``sample`` queries reaches ``target``."""
    import faiss

    from b3mine.config import NeighbourConfig
    from b3mine.embeddings import load_embeddings
    from b3mine.neighbours import build_index

    x = load_embeddings(path, normalize=True).queries
    rng = np.random.default_rng(1)
    q = np.ascontiguousarray(x[np.sort(rng.choice(len(x), sample, replace=False))])
    k = p + m
    exact = faiss.IndexFlatIP(x.shape[1])
    exact.add(x)
    _, truth = exact.search(q, k)
    del exact
    start = time.perf_counter()
    index = build_index(x, k, NeighbourConfig(index="ivf"))
    build_s = time.perf_counter() - start
    results = {}
    chosen = None
    for nprobe in (2, 4, 8, 16, 32, 64, 128, 256):
        index.nprobe = nprobe
        t0 = time.perf_counter()
        _, found = index.search(q, k)
        qps = sample / (time.perf_counter() - t0)
        recall = float(np.mean([len(set(a[p:k]) & set(b[p:k])) / m
                                for a, b in zip(found, truth)]))
        results[nprobe] = {"window_recall": round(recall, 4), "queries_per_s": round(qps)}
        if recall >= target and chosen is None:
            chosen = nprobe
            break
    return {"nprobe": chosen or 256, "nlist": int(index.nlist), "build_s": round(build_s, 1),
            "sweep": results}


def run_engine(engine: str, path: Path, config_json: str, out: Path, workers: int) -> dict:
    """(child process) mine with one engine and return timings."""
    from b3mine.config import MiningConfig

    config = MiningConfig.model_validate_json(config_json)
    stages: dict[str, list[float]] = {}

    def progress(stage: str, fraction: float) -> None:
        now = time.perf_counter()
        span = stages.setdefault(stage, [now, now])
        span[1] = now

    start = time.perf_counter()
    if engine.startswith("dask"):
        from pipelines.engine import run_job

        result = run_job(path, config, out, workers=workers, threads_per_worker=1,
                         progress=progress)
        plan, timings = result.plan, result.timings
    else:
        from b3mine.mining import mine

        plan = mine(path, config, out, progress=progress)
        timings = plan.manifest.stats.get("timings", {})
    total = time.perf_counter() - start
    plan.validate(check_hashes=False)
    stats = plan.manifest.stats
    return {"engine": engine, "total_s": round(total, 1), "stage_s": timings,
            "plan_id": plan.plan_id, "batches_per_epoch": plan.batches_per_epoch,
            "edges": plan.manifest.counts.n_edges, "graph": stats.get("graph"),
            "quality": stats.get("quality")}


def _current_stage(out: Path) -> str:
    """The running stage of the Dask job under ``out`` (its progress.json), else "-"."""
    for f in out.glob(".work/*/progress.json"):
        try:
            return json.loads(f.read_text()).get("stage") or "-"
        except (OSError, ValueError):
            pass
    return "-"


def _anon_gib(pid: int) -> float:
    """A process's anonymous resident memory (heap, not file pages): what a worker holds.
    Memory-mapped inputs and index lists are page cache, shared and evictable, so PSS grows
    with N while this does not need to."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def measured(cmd: list[str], out: Path) -> tuple[dict, dict]:
    """Run ``cmd``; sample its process tree's memory (overall and per stage of the Dask job
    writing under ``out``); return (its JSON result, memory peaks)."""
    import psutil

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    peak: dict = {"rss_sum_gib": 0.0, "pss_gib": 0.0, "worker_pss_gib": 0.0,
                  "client_pss_gib": 0.0, "worker_anon_gib": 0.0, "stage_worker_pss_gib": {},
                  "stage_pss_gib": {}, "stage_worker_anon_gib": {}}
    stop = threading.Event()

    def sample() -> None:
        tick = 0
        while not stop.is_set():
            try:
                procs = [ps] + ps.children(recursive=True)
                rss = sum(p.memory_info().rss for p in procs if p.is_running())
                peak["rss_sum_gib"] = max(peak["rss_sum_gib"], rss / 2**30)
                if tick % 4 == 0:  # PSS reads smaps: slower, so once a second
                    each = [p.memory_full_info().pss / 2**30 for p in procs if p.is_running()]
                    worker = max(each[1:], default=0.0)
                    anon = max((_anon_gib(p.pid) for p in procs[1:]), default=0.0)
                    peak["worker_anon_gib"] = max(peak["worker_anon_gib"], anon)
                    peak["pss_gib"] = max(peak["pss_gib"], sum(each))
                    peak["client_pss_gib"] = max(peak["client_pss_gib"], each[0])
                    peak["worker_pss_gib"] = max(peak["worker_pss_gib"], worker)
                    stage = _current_stage(out)
                    for key, value in (("stage_worker_pss_gib", worker),
                                       ("stage_pss_gib", sum(each)),
                                       ("stage_worker_anon_gib", anon)):
                        peak[key][stage] = round(max(peak[key].get(stage, 0.0), value), 2)
            except (psutil.NoSuchProcess, psutil.AccessDenied, IndexError):
                pass
            tick += 1
            stop.wait(0.25)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    stdout, _ = proc.communicate()
    stop.set()
    thread.join()
    if proc.returncode:
        raise SystemExit(f"{cmd} failed with {proc.returncode}")
    return json.loads(stdout.strip().splitlines()[-1]), {
        k: round(v, 2) if isinstance(v, float) else v for k, v in peak.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--topics", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--cluster-size", type=int, default=32)
    ap.add_argument("--p", type=int, default=30)
    ap.add_argument("--m", type=int, default=100)
    ap.add_argument("--algorithm", default="kaminpar")
    ap.add_argument("--negatives", default="none", choices=["none", "hnps", "hnips"],
                    help="extra negatives (the library's default is hnps; none keeps the "
                         "figures comparable with the earlier global-only runs)")
    ap.add_argument("--region-size", type=int, default=131_072,
                    help="rows per region of the dask-regions engine")
    ap.add_argument("--nprobe", type=int, default=None, help="skip tuning")
    ap.add_argument("--sample", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--engines", default="dask,local")
    ap.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "b3mine-bench")
    ap.add_argument("--child", nargs=4, metavar=("ENGINE", "PATH", "CONFIG", "OUT"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        engine, path, config_json, out = args.child
        print(json.dumps(run_engine(engine, Path(path), config_json, Path(out), args.workers)))
        return

    from b3mine.config import MiningConfig, NegativesConfig, NeighbourConfig

    args.data_dir.mkdir(parents=True, exist_ok=True)
    path = args.data_dir / f"synthetic2-{args.n}x{args.d}-t{args.topics}.parquet"
    t0 = time.perf_counter()
    generate(path, args.n, args.d, args.topics)
    emit(step="data", path=str(path), n=args.n, d=args.d, seconds=round(time.perf_counter() - t0,
                                                                        1))
    if args.nprobe is None:
        tuned = tune_nprobe(path, args.p, args.m, args.sample)
        emit(step="tune", **tuned)
        nprobe = tuned["nprobe"]
    else:
        nprobe = args.nprobe
    config = MiningConfig(batch_size=args.batch_size, cluster_size=args.cluster_size, p=args.p,
                          m=args.m, algorithm=args.algorithm,
                          negatives=NegativesConfig(mode=args.negatives),
                          neighbours=NeighbourConfig(index="ivf", nprobe=nprobe,
                                                     nlist=int(4 * math.sqrt(args.n))))
    results = {}
    for engine in args.engines.split(","):
        out = Path(tempfile.mkdtemp(prefix=f"b3mine-bench-{engine}-", dir=args.data_dir))
        cfg = config.model_copy(update={"region_size": args.region_size}) \
            if engine == "dask-regions" else config
        cmd = [sys.executable, __file__, "--workers", str(args.workers), "--child", engine,
               str(path), cfg.model_dump_json(), str(out)]
        result, peak = measured(cmd, out)
        results[engine] = {**result, **peak}
        emit(step="run", n=args.n, d=args.d, index="ivf", nprobe=nprobe,
             config={"batch_size": args.batch_size, "K": args.cluster_size, "p": args.p,
                     "m": args.m, "algorithm": args.algorithm, "negatives": args.negatives,
                     "region_size": cfg.region_size},
             cores=os.cpu_count(), **results[engine])
    if len(results) == 2:
        a, b = (results[e] for e in args.engines.split(","))
        emit(step="compare", same_plan_id=a["plan_id"] == b["plan_id"],
             edges={e: r["edges"] for e, r in results.items()},
             total_s={e: r["total_s"] for e, r in results.items()},
             peak_pss_gib={e: r["pss_gib"] for e, r in results.items()},
             peak_rss_sum_gib={e: r["rss_sum_gib"] for e, r in results.items()},
             peak_worker_pss_gib={e: r["worker_pss_gib"] for e, r in results.items()},
             peak_worker_anon_gib={e: r["worker_anon_gib"] for e, r in results.items()},
             target={"total_s": 150})


if __name__ == "__main__":
    main()
