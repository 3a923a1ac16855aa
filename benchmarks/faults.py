"""Fault-and-abuse probe: bad inputs and faults against the real service (uvicorn on 127.0.0.1,
SQLite files on disk), the CLI (subprocesses) and the Dask engine (a LocalCluster).

Every case is classified: ``clear`` (a 4xx with a message, a job failed with a one-line reason,
a CLI exit != 0 with one line and no traceback), ``ok`` (the input was fine after all and the
plan is valid), ``5xx`` (other than the registry's documented 503), ``unclear`` (anything else).
Afterwards the probe restarts the service and counts half-written outputs (plan directories
that do not validate, ``.tmp-*`` left behind) and lost jobs (submitted, then missing or stuck).
Prints one JSON line per case and a summary line.

    python benchmarks/faults.py
"""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

_here = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
sys.path.insert(0, str(_here.parent))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from b3mine.plan import BatchPlan  # noqa: E402
from service.app import create_app  # noqa: E402
from service.settings import Settings  # noqa: E402
from service.testing import UvicornThread  # noqa: E402

KEY = "probe-key"
W = {"X-API-Key": KEY}
CFG = {"batch_size": 128, "cluster_size": 16, "p": 3, "m": 20, "seed": 1}
RESULTS: list[dict] = []
SUBMITTED: set[str] = set()


def vectors(n: int, d: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(8, d))[rng.integers(0, 8, n)] + 0.5 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write(path: Path, x: np.ndarray, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": np.arange(len(x)), "embedding":
                             pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)),
                                                               x.shape[1])}), path, **kw)
    return path


def record(kind: str, case: str, outcome: str, detail: str = "") -> None:
    row = {"bench": "faults", "kind": kind, "case": case, "outcome": outcome,
           "detail": detail[:160]}
    RESULTS.append(row)
    print(json.dumps(row), flush=True)


def classify_http(r: httpx.Response) -> str:
    if r.status_code >= 500 and not (r.status_code == 503 and "registry" in r.text):
        return "5xx"
    if 400 <= r.status_code < 500:
        try:
            msg = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            return "unclear"
        return "clear" if msg and "\n" not in msg and "Traceback" not in msg else "unclear"
    return "ok" if r.status_code < 400 or r.status_code == 503 else "unclear"


def wait_job(c: httpx.Client, job_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        j = c.get(f"/v1/jobs/{job_id}").json()
        if j["state"] in ("succeeded", "failed", "cancelled"):
            return j
        time.sleep(0.1)
    return {"state": "stuck", "error": "timed out"}


def submit_case(c: httpx.Client, case: str, body: dict | bytes, *, expect_job: bool = False,
                headers: dict | None = None) -> None:
    if isinstance(body, bytes):
        r = c.post("/v1/jobs", content=body, headers={**W, "Content-Type": "application/json",
                                                       **(headers or {})})
    else:
        r = c.post("/v1/jobs", json=body, headers=headers)
    outcome = classify_http(r)
    if r.status_code in (200, 202):
        job_id = r.json()["id"]
        SUBMITTED.add(job_id)
        j = wait_job(c, job_id)
        if j["state"] == "succeeded":
            try:
                BatchPlan.open(c.app_settings.plans / j["plan_id"], validate=True)
                outcome = "ok" if expect_job else "ok (accepted)"
            except Exception as exc:  # noqa: BLE001 - a published plan that does not validate
                outcome, j["error"] = "unclear", f"invalid plan: {exc}"
        else:
            err = j.get("error") or ""
            outcome = "clear" if err and "\n" not in err and "Traceback" not in err and \
                str(c.app_settings.data_root) not in err else "unclear"
        record("api", case, outcome, f"job {j['state']}: {j.get('error')}")
    else:
        record("api", case, outcome, f"{r.status_code} {r.text}")


def api_cases(c: httpx.Client, root: Path, outside: Path) -> None:
    ds = {"path": "corpora/good.parquet"}
    job = lambda **kw: {"dataset": ds, "config": {**CFG, **kw}}  # noqa: E731
    cases = {
        "traversal ../": {"dataset": {"path": "../../etc/passwd"}, "config": CFG},
        "absolute outside": {"dataset": {"path": str(outside)}, "config": CFG},
        "symlinked file in allowed dir": {"dataset": {"path": "corpora/linked"}, "config": CFG},
        "NUL byte": {"dataset": {"path": "corpora/a\0b"}, "config": CFG},
        "empty path": {"dataset": {"path": " "}, "config": CFG},
        "256-byte component": {"dataset": {"path": "c/" + "x" * 256}, "config": CFG},
        "over PATH_MAX": {"dataset": {"path": "/".join(["y" * 200] * 25)}, "config": CFG},
        "URL when disabled": {"dataset": {"path": "s3://bucket/x.parquet"}, "config": CFG},
        "missing file": {"dataset": {"path": "corpora/none.parquet"}, "config": CFG},
        "batch not multiple of K": job(batch_size=100),
        "negative batch": job(batch_size=-1),
        "unknown config key": job(bogus=1),
        "epochs too many (limit)": job(epochs=100000),
        "p >= N": job(p=400, m=5),
        "p + m > N": job(p=390, m=20),
        "0-row file": {"dataset": {"path": "corpora/empty.parquet"}, "config": CFG},
        "NaN row": {"dataset": {"path": "corpora/nan.parquet"}, "config": CFG},
        "zero vector": {"dataset": {"path": "corpora/zero.parquet"}, "config": CFG},
        "corrupt page": {"dataset": {"path": "corpora/corrupt.parquet"}, "config": CFG},
        "not parquet": {"dataset": {"path": "corpora/text.parquet"}, "config": CFG},
        "missing column": {"dataset": {"path": "corpora/good.parquet", "column": "nope"},
                           "config": CFG},
    }
    for name, body in cases.items():
        submit_case(c, name, body)
    submit_case(c, "1e30-scaled vectors", {"dataset": {"path": "corpora/huge.parquet"},
                                           "config": CFG}, expect_job=True)
    submit_case(c, "1e-30-scaled vectors", {"dataset": {"path": "corpora/tiny.parquet"},
                                            "config": CFG}, expect_job=True)
    for name, raw in {
        "resolution Infinity": b'{"dataset": {"path": "corpora/good.parquet"}, "config": '
                               b'{"resolution": Infinity}}',
        "positive_filter NaN": b'{"dataset": {"path": "corpora/good.parquet"}, "config": '
                               b'{"negatives": {"mode": "hnips", "positive_filter": NaN}}}',
        "not JSON": b"{not json",
        "2 MB body": b'{"pad": "' + b"x" * (2 << 20) + b'"}',
    }.items():
        submit_case(c, name, raw)
    for name, (path, hdr) in {
        "jobs without key": ("/v1/jobs", {"X-API-Key": ""}),
        "wrong key": ("/v1/jobs", {"X-API-Key": "nope"}),
        "unknown plan": ("/v1/plans/nope", {}),
        "plan id traversal": ("/v1/plans/..%2Fjobs.sqlite", {}),
        "unknown job": ("/v1/jobs/nope", {}),
        "bad page limit": ("/v1/plans/x/epochs/0/batches?limit=-1", {}),
    }.items():
        r = c.get(path, headers=hdr)
        record("api", name, classify_http(r), f"{r.status_code} {r.text}")


def cli_cases(root: Path) -> None:
    base = [sys.executable, "-m", "b3mine.cli", "mine", "--batch-size", "128",
            "--cluster-size", "16", "--p", "3", "--m", "20"]
    blocker = root / "blocker"
    blocker.write_text("")
    corpora = root / "corpora"
    cases = {
        "missing file": ["--embeddings", str(root / "none.parquet")],
        "0-row file": ["--embeddings", str(corpora / "empty.parquet")],
        "NaN row": ["--embeddings", str(corpora / "nan.parquet")],
        "corrupt page": ["--embeddings", str(corpora / "corrupt.parquet")],
        "not parquet": ["--embeddings", str(corpora / "text.parquet")],
        "pickled npy": ["--embeddings", str(root / "pickled.npy"), "--ids-path",
                        str(root / "ids.txt")],
        "pickled ids": ["--embeddings", str(root / "x.npy"), "--ids-path",
                        str(root / "ids_pickled.npy")],
        "output is a file": ["--embeddings", str(corpora / "good.parquet"), "--out",
                             str(blocker)],
        "output under a file": ["--embeddings", str(corpora / "good.parquet"), "--out",
                                str(blocker / "plans")],
        "p >= N": ["--embeddings", str(corpora / "good.parquet"), "--p", "400"],
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for name, args in cases.items():
        out = ["--out", str(root / "cli-plans")] if "--out" not in args else []
        p = subprocess.run(base + args + out, capture_output=True, text=True, env=env,
                           timeout=300)
        err = p.stderr.strip()
        clear = p.returncode != 0 and "Traceback" not in err and 0 < len(err.splitlines()) <= 2
        record("cli", name, "clear" if clear else "unclear",
               f"exit {p.returncode}: {err.splitlines()[-1] if err else ''}")


def fault_cases(settings: Settings) -> None:
    """SQLite faults and killed mining processes against a live server (in this process, so
    the probe can reach its registry connection and its mining child)."""
    entered, hold = threading.Event(), threading.Event()

    def hook(job_id: str, stage: str, fraction: float) -> None:
        if stage == "graph" and not hold.is_set():
            entered.set()
            hold.wait(60)

    app = create_app(settings, progress_hook=hook)
    reg = app.state.ctx.registry
    with UvicornThread(app) as s, httpx.Client(base_url=s.url, timeout=60, headers=W) as c:
        c.app_settings = settings  # type: ignore[attr-defined]
        # read-only registry while a job runs
        jid = c.post("/v1/jobs", json={"dataset": {"path": "corpora/good.parquet"},
                                       "config": {**CFG, "seed": 50}}).json()["id"]
        SUBMITTED.add(jid)
        entered.wait(60)
        reg._conn.execute("PRAGMA query_only = 1")
        ready = c.get("/readyz")
        r = c.post("/v1/jobs", json={"dataset": {"path": "corpora/good.parquet"},
                                     "config": {**CFG, "seed": 51}})
        record("fault", "read-only registry: /readyz", "clear" if ready.status_code == 503
               else "unclear", f"{ready.status_code}")
        record("fault", "read-only registry: POST", "clear" if r.status_code == 503 else
               classify_http(r), f"{r.status_code} {r.text}")
        hold.set()
        time.sleep(1)
        reg._conn.execute("PRAGMA query_only = 0")
        j = wait_job(c, jid)
        record("fault", "read-only registry: running job ends", "ok" if j["state"] ==
               "succeeded" else "unclear", j["state"])
        # registry files deleted under the server
        for suffix in ("", "-wal", "-shm"):
            Path(f"{settings.db}{suffix}").unlink(missing_ok=True)
        ready = c.get("/readyz")
        record("fault", "registry deleted: /readyz restores", "ok" if ready.status_code == 200
               else "unclear", f"{ready.status_code}")
        # SIGKILL the mining child in every stage it reports
        for stage in ("load", "neighbours", "clusters", "write"):
            seen = threading.Event()
            target = {"stage": stage}

            def kill_hook(job_id: str, st: str, fraction: float, seen=seen, target=target):
                if st == target["stage"]:
                    seen.set()

            app.state.ctx.runner.hook = kill_hook
            jid = c.post("/v1/jobs", json={"dataset": {"path": "corpora/good.parquet"},
                                           "config": {**CFG, "seed": 60 + len(stage)}}
                         ).json()["id"]
            SUBMITTED.add(jid)
            seen.wait(120)
            for child in multiprocessing.active_children():
                if child.name == "b3mine-mine":
                    os.kill(child.pid, signal.SIGKILL)
            j = wait_job(c, jid)
            ok = j["state"] == "failed" and "exited with code" in (j.get("error") or "") or \
                j["state"] == "succeeded"
            record("fault", f"SIGKILL mining process in {stage}", "clear" if ok else
                   "unclear", f"{j['state']}: {j.get('error')}")


def dask_cases(root: Path) -> None:
    from distributed import Client, LocalCluster

    from pipelines.engine import run_job

    out = root / "dask-plans"
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        for name, path, cfg in (("NaN row (load fails)", "nan.parquet", CFG),
                                ("p >= N", "good.parquet", {**CFG, "p": 400}),
                                ("corrupt page", "corrupt.parquet", CFG)):
            try:
                run_job(root / "corpora" / path, cfg, out, client=client, retries=0)
                record("dask", name, "unclear", "no error")
            except Exception as exc:  # noqa: BLE001 - classified below
                msg = str(exc)
                left = [p for p in (out / ".work").iterdir() if p.is_dir()] \
                    if (out / ".work").exists() else []
                clear = "\n" not in msg and not left
                record("dask", name, "clear" if clear else "unclear",
                       f"{type(exc).__name__}: {msg} (work dirs left: {len(left)})")


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="b3mine-faults-") as tmp:
        tmp = Path(tmp)
        root = tmp / "data"
        corpora = root / "corpora"
        x = vectors(400)
        write(corpora / "good.parquet", x)
        write(corpora / "huge.parquet", x * np.float32(1e30))
        write(corpora / "tiny.parquet", x * np.float32(1e-30))
        write(corpora / "empty.parquet", x[:0])
        bad = x.copy()
        bad[123, 4] = np.nan
        write(corpora / "nan.parquet", bad)
        zero = x.copy()
        zero[77] = 0
        write(corpora / "zero.parquet", zero)
        corrupt = write(corpora / "corrupt.parquet", x, write_page_checksum=True)
        data = bytearray(corrupt.read_bytes())
        col = pq.ParquetFile(corrupt).metadata.row_group(0).column(1)
        first = col.dictionary_page_offset or col.data_page_offset  # the chunk's first page
        mid, end = first + col.total_compressed_size // 4, first + col.total_compressed_size
        data[mid : min(mid + 4096, end)] = bytes(b ^ 0xFF for b in data[mid : min(mid + 4096,
                                                                                   end)])
        corrupt.write_bytes(bytes(data))
        (corpora / "text.parquet").write_text("not parquet at all")
        outside = write(tmp / "outside.parquet", x)
        (corpora / "linked").mkdir()
        os.symlink(outside, corpora / "linked" / "a.parquet")
        np.save(root / "x.npy", x)
        np.save(root / "pickled.npy", np.array([x[0], "a"], dtype=object), allow_pickle=True)
        np.save(root / "ids_pickled.npy", np.array([object()] * 400, dtype=object),
                allow_pickle=True)
        (root / "ids.txt").write_text("\n".join(map(str, range(400))))
        (root / "plans" / ".tmp-deadbeef-12345678").mkdir(parents=True)  # a killed write

        settings = Settings(data_root=root, api_keys=[KEY], max_plan_rows=1_000_000)
        with UvicornThread(create_app(settings)) as s, \
                httpx.Client(base_url=s.url, timeout=120, headers=W) as c:
            c.app_settings = settings  # type: ignore[attr-defined]
            api_cases(c, root, outside)
        fault_cases(settings)
        cli_cases(root)
        dask_cases(root)

        # restart: every submitted job still known and final; no half-written output
        with UvicornThread(create_app(settings)) as s, \
                httpx.Client(base_url=s.url, timeout=60, headers=W) as c:
            jobs = {j["id"]: j for j in c.get("/v1/jobs", params={"limit": 1000}).json()["jobs"]}
        lost = [j for j in SUBMITTED if j not in jobs or jobs[j]["state"] in
                ("queued", "running")]
        half = 0
        for plans in (root / "plans", root / "cli-plans", root / "dask-plans"):
            if not plans.exists():
                continue
            for d in plans.iterdir():
                if d.name.startswith(".tmp-"):
                    half += 1
                elif d.is_dir() and not d.name.startswith("."):
                    try:
                        BatchPlan.open(d, validate=True)
                    except Exception:  # noqa: BLE001 - counted
                        half += 1
        counts: dict[str, int] = {}
        for r in RESULTS:
            counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
        print(json.dumps({"bench": "faults_summary", "cases": len(RESULTS),
                          "clear_errors": counts.get("clear", 0),
                          "handled_ok": counts.get("ok", 0) + counts.get("ok (accepted)", 0),
                          "unclear": counts.get("unclear", 0), "5xx": counts.get("5xx", 0),
                          "half_written_outputs": half, "jobs_submitted": len(SUBMITTED),
                          "jobs_lost": len(lost)}), flush=True)


if __name__ == "__main__":
    main()
