"""The real app under a real uvicorn on 127.0.0.1: mine through the API, read the plan back in
JSON and Arrow and compare with the plan on disk, ETags, auth, traversal, and restart recovery
(a new app over the same SQLite file)."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pytest

from b3mine.plan import BatchPlan
from service.app import create_app
from service.jobs import RESTART_REASON
from service.plans import ARROW_STREAM
from service.settings import Settings
from service.testing import UvicornThread, populate_data_root

KEY = "e2e-key"
W = {"X-API-Key": KEY}


def body(seed: int, **extra) -> dict:
    cfg = {"batch_size": 128, "cluster_size": 16, "p": 3, "m": 20, "epochs": 2, "seed": seed,
           "negatives": {"mode": "hnps", "k": 2}, **extra}
    return {"dataset": {"path": "corpora/corpus.parquet"}, "config": cfg}


def poll(client: httpx.Client, job_id: str, states: set[str], timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    seen = set()
    while time.monotonic() < deadline:
        r = client.get(f"/v1/jobs/{job_id}", headers=W)
        assert r.status_code == 200, r.text
        job = r.json()
        seen.add((job["state"], job["stage"]))
        if job["state"] in states:
            job["seen"] = seen
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached {states}: {seen}")


@pytest.fixture()
def settings(tmp_path: Path, corpus_path: Path) -> Settings:
    populate_data_root(tmp_path / "data", corpus_path)
    return Settings(data_root=tmp_path / "data", api_keys=[KEY], max_page=50)


def test_mine_then_read_back(settings: Settings) -> None:
    with UvicornThread(create_app(settings)) as server, \
            httpx.Client(base_url=server.url, timeout=30) as c:
        assert c.get("/readyz").status_code == 200
        r = c.post("/v1/jobs", json=body(seed=11))
        assert r.status_code == 401
        r = c.post("/v1/jobs", json=body(seed=11), headers={"X-API-Key": "wrong"})
        assert r.status_code == 403
        r = c.post("/v1/jobs", json={"dataset": {"path": "../../../etc/passwd"}}, headers=W)
        assert r.status_code == 403 and r.json()["error"]["field"] == "body.dataset.path"

        r = c.post("/v1/jobs", json=body(seed=11), headers=W)
        assert r.status_code == 202, r.text
        location = r.headers["Location"]
        job = poll(c, location.rsplit("/", 1)[1], {"succeeded", "failed"})
        assert job["state"] == "succeeded", job
        assert any(state == "running" and stage for state, stage in job["seen"]) or \
            job["seen"] == {("succeeded", "write")}
        pid = job["plan_id"]
        again = c.post("/v1/jobs", json=body(seed=11), headers=W)
        assert again.status_code == 200 and again.json()["plan_id"] == pid

        plan = BatchPlan.open(settings.plans / pid, validate=True)
        assert plan.has_negatives and plan.epochs == 2
        for epoch in range(plan.epochs):
            expect = plan.epoch_table(epoch)
            # JSON, page by page through the "next" links
            url, batches = f"/v1/plans/{pid}/epochs/{epoch}/batches?limit=3", []
            while url:
                page = c.get(url).json()
                assert page["total"] == plan.batches_per_epoch
                batches += page["batches"]
                url = page["next"]
            assert [b["batch"] for b in batches] == list(range(plan.batches_per_epoch))
            rows = np.array([b["rows"] for b in batches])
            assert np.array_equal(rows, plan.batch_rows(epoch))
            assert sum((b["ids"] for b in batches), []) == expect.column("id").to_pylist()
            assert sum((b["padded"] for b in batches), []) == expect.column("padded").to_pylist()
            negs = sum((b["negatives"] for b in batches), [])
            assert negs == [[n for n in r if n >= 0]
                            for r in plan.negatives_for(rows.reshape(-1)).tolist()]
            neg_ids = sum((b["negative_ids"] for b in batches), [])
            assert neg_ids == [[r + 1000 for r in n] for n in negs]  # conftest ids = row + 1000
            # Arrow: the whole epoch in one stream, and a page of it
            r = c.get(f"/v1/plans/{pid}/epochs/{epoch}/batches",
                      headers={"Accept": ARROW_STREAM})
            assert r.headers["content-type"] == ARROW_STREAM
            table = pa.ipc.open_stream(r.content).read_all()
            cols = ["batch", "position", "row", "id", "cluster", "padded"]
            assert table.select(cols).equals(expect.select(cols))
            assert table.column("negatives").to_pylist() == negs
            assert table.column("negative_ids").to_pylist() == neg_ids
            r = c.get(f"/v1/plans/{pid}/epochs/{epoch}/batches", params={"start": 2, "limit": 3},
                      headers={"Accept": ARROW_STREAM})
            part = pa.ipc.open_stream(r.content).read_all()
            b = plan.batch_size
            assert part.select(cols).equals(expect.slice(2 * b, 3 * b).select(cols))

        # ETag round trip over HTTP
        url = f"/v1/plans/{pid}/epochs/1/batches/0"
        first = c.get(url, params={"rank": 1, "world_size": 2})
        assert first.status_code == 200 and len(first.json()["rows"]) == plan.batch_size // 2
        second = c.get(url, params={"rank": 1, "world_size": 2},
                       headers={"If-None-Match": first.headers["ETag"]})
        assert second.status_code == 304 and second.headers["ETag"] == first.headers["ETag"]
        # plan ids cannot walk out of the plans directory
        assert c.get("/v1/plans/..%2Fjobs.sqlite").status_code == 404
        assert c.get("/v1/plans/%2E%2E").status_code == 404
        assert "b3mine_jobs_finished_total" in c.get("/metrics").text


def test_restart_recovery(settings: Settings) -> None:
    """Policy: running at a restart -> failed with RESTART_REASON; queued -> resumed;
    resubmitting the failed request runs it again."""
    hold, entered = threading.Event(), threading.Event()

    def hook(job_id: str, stage: str, fraction: float) -> None:
        if stage == "neighbours":  # park the first job mid-run
            entered.set()
            hold.wait(60)

    one = settings.model_copy(update={"job_workers": 1})
    server = UvicornThread(create_app(one, progress_hook=hook)).start()
    try:
        with httpx.Client(base_url=server.url, timeout=30, headers=W) as c:
            running = c.post("/v1/jobs", json=body(seed=21)).json()["id"]
            assert entered.wait(60)
            job = c.get(f"/v1/jobs/{running}", headers=W).json()
            assert job["state"] == "running" and job["stage"] == "neighbours"
            queued = c.post("/v1/jobs", json=body(seed=22, epochs=1)).json()
            assert queued["state"] == "queued"
    finally:
        server.stop()  # the parked job's thread is still inside the engine

    # A new app over the same database file, as after a crash or a redeploy.
    with UvicornThread(create_app(settings)) as server2, \
            httpx.Client(base_url=server2.url, timeout=30, headers=W) as c:
        job = c.get(f"/v1/jobs/{running}", headers=W).json()
        assert job["state"] == "failed" and job["error"] == RESTART_REASON
        hold.set()  # the old worker wakes up: it must not overwrite the recovered row
        resumed = poll(c, queued["id"], {"succeeded", "failed"})
        assert resumed["state"] == "succeeded", resumed
        assert c.get(f"/v1/jobs/{running}", headers=W).json()["state"] == "failed"
        r = c.post("/v1/jobs", json=body(seed=21))
        assert r.status_code == 202 and r.json()["id"] == running
        done = poll(c, running, {"succeeded", "failed"})
        assert done["state"] == "succeeded" and done["attempts"] == 2, done
        assert BatchPlan.open(settings.plans / done["plan_id"]).epochs == 2
