"""Benchmark of the REST service on loopback: single-batch latency and whole-epoch Arrow streams.

Writes a synthetic 1,000,000-example plan with ``b3mine.plan.write_plan`` (random clusters; no
mining), starts ``b3mine serve`` in a subprocess on 127.0.0.1 and drives it from this process with
httpx async clients. Prints one JSON line per measurement.

    python benchmarks/service.py                    # defaults: 1M examples, B=1000
    python benchmarks/service.py --examples 200000 --requests 200

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

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from b3mine.config import MiningConfig  # noqa: E402
from b3mine.plan import DatasetInfo, PlanCounts, PlanTables, write_plan  # noqa: E402
from service.plans import ARROW_STREAM  # noqa: E402
from service.testing import free_port  # noqa: E402


def synthetic_plan(root: Path, n: int, batch_size: int, cluster_size: int, seed: int = 0) -> str:
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
    plan = write_plan(
        root, config=config,
        dataset=DatasetInfo(fingerprint=f"synthetic-{n}-{seed}", n_rows=n, dim=768, paired=False,
                            id_type="int64", source="benchmarks/service.py"),
        counts=PlanCounts(n_clusters=n_clusters, cluster_size=cluster_size,
                          batch_size=batch_size, epochs=1, batches_per_epoch=nb,
                          examples_per_epoch=[nb * batch_size], remainder_dropped=0,
                          remainder_padded=0, last_batch_padded=0),
        tables=PlanTables(ids=np.arange(n, dtype=np.int64) + 10**9, clusters=clusters,
                          cluster_padded=np.zeros_like(clusters, bool), batches=batches,
                          batch_cluster=batch_cluster.astype(np.int32),
                          batch_padded=np.zeros_like(batches, bool)))
    return plan.plan_id


def start_server(data_root: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "B3MINE_DATA_ROOT": str(data_root)}
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

    async def get(self, path: str) -> tuple[int, bytes]:
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        return status, await self.reader.readexactly(length)

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

    start = time.perf_counter()
    await asyncio.gather(*(one_client(c) for c in conns))
    wall = time.perf_counter() - start
    for c in conns:
        c.close()
    ms = np.array(latencies) * 1000
    return {"bench": "single_batch", "clients": clients, "requests": len(ms),
            "throughput_rps": round(len(ms) / wall, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2), "max_ms": round(float(ms.max()), 2)}


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
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="b3mine-bench-") as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        plan_id = synthetic_plan(root / "plans", args.examples, args.batch_size,
                                 args.cluster_size)
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
            for i in range(3):
                print(json.dumps(stream_epoch(url, plan_id, f"warm {i + 1}")), flush=True)
            for clients in args.clients:
                per_client = max(1, args.requests // clients)
                result = asyncio.run(fetch_batches(port, plan_id, n_batches, clients, per_client,
                                                   seed=clients))
                print(json.dumps(result), flush=True)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(20)


if __name__ == "__main__":
    main()
