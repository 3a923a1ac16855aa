"""Benchmark of the REST service on loopback: single-batch latency, whole-epoch Arrow streams,
a mixed load, and latency while the service mines a job.

Writes a synthetic 1,000,000-example plan with ``b3mine.plan.write_plan`` (random clusters; no
mining), starts ``b3mine serve`` in a subprocess on 127.0.0.1 and drives it from this process with
httpx async clients. Prints one JSON line per measurement.

    python benchmarks/service.py                    # defaults: 1M examples, B=1000
    python benchmarks/service.py --examples 200000 --requests 200
    # mixed load (60% single batches, 25% 10-batch JSON pages, 15% 20-batch Arrow pages) on a
    # plan with 5 extra negatives per row, idle and while a 200k-row job mines; /healthz and
    # batch latency per mining stage:
    python benchmarks/service.py --examples 200000 --negatives 5 --mixed --job-rows 200000

Targets on a 2-core machine: p99 < 25 ms at 16 clients; an epoch of 1M ids streamed in < 1 s.
Client and server share the machine's cores, so the numbers include the client's own cost.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# This file is named like the package it measures: drop its own directory from the import path
# so that ``import service`` finds the package, not this script.
_here = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
sys.path.insert(0, str(_here.parent))  # benchmarks.common

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from b3mine.config import MiningConfig  # noqa: E402
from b3mine.plan import DatasetInfo, PlanCounts, PlanTables, write_plan  # noqa: E402
from service.plans import ARROW_STREAM  # noqa: E402
from service.testing import free_port  # noqa: E402


def synthetic_plan(root: Path, n: int, batch_size: int, cluster_size: int, seed: int = 0,
                   negatives: int = 0) -> str:
    rng = np.random.default_rng(seed)
    n_clusters = n // cluster_size
    rows = rng.permutation(n)[: n_clusters * cluster_size].astype(np.int64)
    clusters = rows.reshape(n_clusters, cluster_size)
    per_batch = batch_size // cluster_size
    nb = n_clusters // per_batch
    order = rng.permutation(n_clusters)[: nb * per_batch].reshape(nb, per_batch)
    batches = clusters[order].reshape(1, nb, batch_size)
    batch_cluster = np.repeat(order, cluster_size, axis=1).reshape(1, nb, batch_size)
    config = MiningConfig(batch_size=batch_size, cluster_size=cluster_size, p=0, m=1)
    neg = rng.integers(0, n, (n, negatives)) if negatives else None
    plan = write_plan(
        root, config=config,
        dataset=DatasetInfo(fingerprint=f"synthetic-{n}-{seed}", n_rows=n, dim=768, paired=False,
                            id_type="int64", source="benchmarks/service.py"),
        counts=PlanCounts(n_clusters=n_clusters, cluster_size=cluster_size,
                          batch_size=batch_size, epochs=1, batches_per_epoch=nb,
                          examples_per_epoch=[nb * batch_size], remainder_dropped=0,
                          remainder_padded=0, last_batch_padded=0, extra_negatives=negatives),
        tables=PlanTables(ids=np.arange(n, dtype=np.int64) + 10**9, clusters=clusters,
                          cluster_padded=np.zeros_like(clusters, bool), batches=batches,
                          batch_cluster=batch_cluster.astype(np.int32),
                          batch_padded=np.zeros_like(batches, bool), negatives=neg))
    return plan.plan_id


API_KEY = "bench-key"


def start_server(data_root: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "B3MINE_DATA_ROOT": str(data_root), "B3MINE_API_KEYS": API_KEY}
    proc = subprocess.Popen([sys.executable, "-c", "from b3mine.cli import main; main()",
                             "serve", "--host", "127.0.0.1", "--port", str(port),
                             "--log-level", "warning"], env=env, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start")


class RawConnection:
    """A minimal HTTP/1.1 keep-alive client over asyncio streams.

    httpx's async pool costs the client more CPU per request than the server spends answering;
    on two shared cores that would measure the client. This sends a GET and reads a
    Content-Length body, nothing more (every single-batch response has one).
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port

    async def open(self) -> RawConnection:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def get(self, path: str, headers: str = "") -> tuple[int, bytes]:
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n{headers}\r\n"
                          .encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length, chunked = 0, False
        for line in head.split(b"\r\n")[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
            elif line.lower() == b"transfer-encoding: chunked":
                chunked = True
        if not chunked:
            return status, await self.reader.readexactly(length)
        body = bytearray()  # streamed pages: HTTP/1.1 chunked encoding
        while True:
            size = int((await self.reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")
                return status, bytes(body)
            body += await self.reader.readexactly(size + 2)
            del body[-2:]

    def close(self) -> None:
        self.writer.close()


async def fetch_batches(port: int, plan_id: str, n_batches: int, clients: int, per_client: int,
                        seed: int) -> dict:
    rng = random.Random(seed)
    latencies: list[float] = []
    conns = [await RawConnection("127.0.0.1", port).open() for _ in range(clients)]

    async def one_client(conn: RawConnection) -> None:
        for _ in range(per_client):
            k = rng.randrange(n_batches)
            t = time.perf_counter()
            status, body = await conn.get(f"/v1/plans/{plan_id}/epochs/0/batches/{k}")
            latencies.append(time.perf_counter() - t)
            if status != 200 or not body.startswith(b"{"):
                raise RuntimeError(f"batch {k}: HTTP {status}")

    wall = await run_clients(conns, one_client)
    ms = [x * 1000 for x in latencies]
    stats = _stats(ms)
    del stats["n"]
    return {"bench": "single_batch", "clients": clients, "requests": len(ms),
            "throughput_rps": round(len(ms) / wall, 1), **stats}


async def run_clients(conns: list[RawConnection], one_client) -> float:
    """Run one coroutine per connection to the end; close them; return the wall time."""
    start = time.perf_counter()
    await asyncio.gather(*(one_client(c) for c in conns))
    wall = time.perf_counter() - start
    for c in conns:
        c.close()
    return wall


def _stats(ms: list[float]) -> dict:
    a = np.array(ms) if ms else np.zeros(1)
    return {"n": len(ms), "p50_ms": round(float(np.percentile(a, 50)), 2),
            "p99_ms": round(float(np.percentile(a, 99)), 2), "max_ms": round(float(a.max()), 2)}


MIX = (("single", 0.60), ("json_page_10", 0.25), ("arrow_page_20", 0.15))


async def mixed_load(port: int, plan_id: str, n_batches: int, clients: int, per_client: int,
                     seed: int, label: str) -> dict:
    """60% single batches, 25% 10-batch JSON pages, 15% 20-batch Arrow pages."""
    rng = random.Random(seed)
    kinds, weights = zip(*MIX)
    latencies: dict[str, list[float]] = {k: [] for k in kinds}
    conns = [await RawConnection("127.0.0.1", port).open() for _ in range(clients)]
    arrow = f"Accept: {ARROW_STREAM}\r\n"

    async def one_client(conn: RawConnection) -> None:
        for _ in range(per_client):
            kind = rng.choices(kinds, weights)[0]
            base = f"/v1/plans/{plan_id}/epochs/0/batches"
            if kind == "single":
                path, head = f"{base}/{rng.randrange(n_batches)}", ""
            elif kind == "json_page_10":
                path, head = f"{base}?start={rng.randrange(max(1, n_batches - 10))}&limit=10", ""
            else:
                path, head = f"{base}?start={rng.randrange(max(1, n_batches - 20))}&limit=20", arrow
            t = time.perf_counter()
            status, _ = await conn.get(path, head)
            latencies[kind].append((time.perf_counter() - t) * 1000)
            if status != 200:
                raise RuntimeError(f"{path}: HTTP {status}")

    wall = await run_clients(conns, one_client)
    every = [x for v in latencies.values() for x in v]
    return {"bench": "mixed", "run": label, "clients": clients,
            "throughput_rps": round(len(every) / wall, 1), **_stats(every),
            **{kind: _stats(v) for kind, v in latencies.items()}}


def write_corpus(path: Path, n: int, d: int) -> None:
    import pyarrow.parquet as pq

    from benchmarks.common import two_level_mixture

    x = two_level_mixture(n, d, coarse=100, fine_per_coarse=20, seed=3)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": pa.array(np.arange(n)),
                             "embedding": pa.FixedSizeListArray.from_arrays(
                                 pa.array(x.reshape(-1)), d)}), path)


def job_body(config: dict) -> dict:
    return {"dataset": {"path": "corpora/bench.parquet"}, "config": config}


async def during_job(port: int, plan_id: str, n_batches: int, config: dict, clients: int,
                     mixed_clients: int) -> tuple[list[dict], str]:
    """Submit a job, then probe /healthz (one request at a time) and single batches
    (``clients`` connections) until it ends; latencies are grouped by the job's stage.
    ``mixed_clients`` > 0 also runs the mixed load during the job."""
    url = f"http://127.0.0.1:{port}"
    key = {"X-API-Key": API_KEY}
    async with httpx.AsyncClient(base_url=url, timeout=120, headers=key) as http:
        r = await http.post("/v1/jobs", json=job_body(config))
        r.raise_for_status()
        job = r.json()["id"]
        current = {"stage": "queued", "state": "queued"}
        by_stage: dict[str, dict[str, list[float]]] = {}
        done = asyncio.Event()

        async def poll() -> None:
            while True:
                j = (await http.get(f"/v1/jobs/{job}")).json()
                current.update(stage=j["stage"] or j["state"], state=j["state"])
                if j["state"] in ("succeeded", "failed", "cancelled"):
                    done.set()
                    return
                await asyncio.sleep(0.2)

        def record(what: str, ms: float) -> None:
            by_stage.setdefault(current["stage"], {"healthz": [], "batch": []})[what].append(ms)

        async def healthz() -> None:
            conn = await RawConnection("127.0.0.1", port).open()
            while not done.is_set():
                t = time.perf_counter()
                status, _ = await conn.get("/healthz")
                record("healthz", (time.perf_counter() - t) * 1000)
                assert status == 200
                await asyncio.sleep(0.02)
            conn.close()

        async def batches(seed: int) -> None:
            rng = random.Random(seed)
            conn = await RawConnection("127.0.0.1", port).open()
            while not done.is_set():
                t = time.perf_counter()
                status, _ = await conn.get(
                    f"/v1/plans/{plan_id}/epochs/0/batches/{rng.randrange(n_batches)}")
                record("batch", (time.perf_counter() - t) * 1000)
                assert status == 200
                await asyncio.sleep(0.01)
            conn.close()

        mixed: list[dict] = []

        async def mixed_during() -> None:
            while not done.is_set() and current["stage"] in ("queued", "start", "load"):
                await asyncio.sleep(0.1)
            if not done.is_set():
                mixed.append(await mixed_load(port, plan_id, n_batches, mixed_clients, 40,
                                              seed=99, label="while a job mines"))

        started = time.perf_counter()
        tasks = [poll(), healthz(), *(batches(i) for i in range(clients))]
        if mixed_clients:
            tasks.append(mixed_during())
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - started
    rows = [{"bench": "during_job", "stage": stage, **{f"healthz_{k}": v for k, v in
                                                         _stats(d["healthz"]).items()},
             **{f"batch_{k}": v for k, v in _stats(d["batch"]).items()}}
            for stage, d in by_stage.items()]
    rows.append({"bench": "during_job", "stage": "ALL", "job_state": current["state"],
                 "job_wall_s": round(wall, 1),
                 **{f"healthz_{k}": v for k, v in _stats(
                     [x for d in by_stage.values() for x in d["healthz"]]).items()},
                 **{f"batch_{k}": v for k, v in _stats(
                     [x for d in by_stage.values() for x in d["batch"]]).items()}})
    return rows + mixed, current["state"]


def stream_epoch(url: str, plan_id: str, label: str) -> dict:
    start = time.perf_counter()
    with httpx.Client(base_url=url, timeout=60) as client:
        r = client.get(f"/v1/plans/{plan_id}/epochs/0/batches", headers={"Accept": ARROW_STREAM})
        r.raise_for_status()
        table = pa.ipc.open_stream(r.content).read_all()
    seconds = time.perf_counter() - start
    return {"bench": "epoch_arrow", "run": label, "rows": table.num_rows,
            "bytes": len(r.content), "seconds": round(seconds, 3),
            "ids_per_s": round(table.num_rows / seconds)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=1_000_000)
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--cluster-size", type=int, default=40)
    ap.add_argument("--requests", type=int, default=800, help="requests per concurrency level")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--negatives", type=int, default=0, help="extra negatives per row in the "
                    "served plan")
    ap.add_argument("--mixed", action="store_true", help="also run the mixed load")
    ap.add_argument("--job-rows", type=int, default=0, help="mine a job of this many rows "
                    "(d=--job-dim, IVF, METIS) and measure latency per stage while it runs")
    ap.add_argument("--job-dim", type=int, default=64)
    ap.add_argument("--skip-single", action="store_true", help="skip the single-batch and "
                    "epoch-stream runs")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="b3mine-bench-") as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        plan_id = synthetic_plan(root / "plans", args.examples, args.batch_size,
                                 args.cluster_size, negatives=args.negatives)
        if args.job_rows:
            write_corpus(root / "corpora" / "bench.parquet", args.job_rows, args.job_dim)
        print(json.dumps({"bench": "setup", "examples": args.examples,
                          "batch_size": args.batch_size, "write_plan_s":
                          round(time.perf_counter() - t, 2)}), flush=True)
        port = free_port()
        proc = start_server(root, port)
        url = f"http://127.0.0.1:{port}"
        try:
            n_batches = httpx.get(f"{url}/v1/plans/{plan_id}").json()["manifest"]["counts"][
                "batches_per_epoch"]
            # First touch converts the epoch to a memory-mapped Arrow file: reported separately.
            print(json.dumps(stream_epoch(url, plan_id, "cold (builds the epoch cache)")),
                  flush=True)
            for i in range(0 if args.skip_single else 3):
                print(json.dumps(stream_epoch(url, plan_id, f"warm {i + 1}")), flush=True)
            if args.mixed:
                for clients in args.clients:
                    print(json.dumps(asyncio.run(mixed_load(
                        port, plan_id, n_batches, clients, max(1, args.requests // clients),
                        seed=clients, label="idle"))), flush=True)
            if args.job_rows:
                config = {"batch_size": 1024, "cluster_size": 32, "p": 30, "m": 100,
                          "algorithm": "metis", "neighbours": {"index": "ivf"}}
                rows, _ = asyncio.run(during_job(port, plan_id, n_batches, config, clients=4,
                                                 mixed_clients=16 if args.mixed else 0))
                for row in rows:
                    print(json.dumps(row), flush=True)
            for clients in [] if args.skip_single else args.clients:
                per_client = max(1, args.requests // clients)
                result = asyncio.run(fetch_batches(port, plan_id, n_batches, clients, per_client,
                                                   seed=clients))
                print(json.dumps(result), flush=True)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(20)


if __name__ == "__main__":
    main()
