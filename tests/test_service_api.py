"""Fine-grained API behaviour through FastAPI's TestClient, over a real plan and a real SQLite
registry (the end-to-end runs under uvicorn are in test_service_e2e.py)."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from fastapi.testclient import TestClient

from b3mine.plan import BatchPlan
from service.app import create_app
from service.jobs import JobRegistry, owner_is_orphaned
from service.plans import ARROW_STREAM
from service.settings import Settings
from b3mine.sharding import ShardError, rank_slice
from service.testing import populate_data_root

KEY = "k-" + "x" * 30
W = {"X-API-Key": KEY}
ARROW = {"Accept": ARROW_STREAM}


@pytest.fixture()
def root(tmp_path: Path, corpus_path: Path, small_plan: BatchPlan) -> Path:
    populate_data_root(tmp_path / "data", corpus_path, [small_plan.path])
    return tmp_path / "data"


def make_client(root: Path, **overrides) -> TestClient:
    settings = Settings(data_root=root, api_keys=[KEY, "other-key"], **overrides)
    return TestClient(create_app(settings), raise_server_exceptions=False)


@pytest.fixture()
def client(root: Path):
    with make_client(root) as c:
        yield c


def job_body(path: str = "corpora/corpus.parquet", **config) -> dict:
    cfg = {"batch_size": 128, "cluster_size": 16, "p": 3, "m": 20, "epochs": 1, "seed": 3}
    cfg.update(config)
    return {"dataset": {"path": path}, "config": cfg}


def error_field(response) -> str | None:
    body = response.json()
    assert set(body) == {"error"} and "message" in body["error"], body
    return body["error"]["field"]


# -- auth ------------------------------------------------------------------------------------

def test_writes_need_a_key(client: TestClient) -> None:
    r = client.post("/v1/jobs", json=job_body())
    assert r.status_code == 401 and error_field(r) == "header.X-API-Key"
    assert "WWW-Authenticate" in r.headers
    r = client.post("/v1/jobs", json=job_body(), headers={"X-API-Key": KEY + "z"})
    assert r.status_code == 403 and error_field(r) == "header.X-API-Key"
    assert client.delete("/v1/jobs/abc").status_code == 401
    assert client.get("/v1/plans").status_code == 200  # reads are open by default


def test_reads_need_a_key_when_configured(root: Path) -> None:
    with make_client(root, require_key_for_reads=True) as c:
        assert c.get("/v1/plans").status_code == 401
        assert c.get("/v1/plans", headers={"X-API-Key": "nope"}).status_code == 403
        assert c.get("/v1/plans", headers={"X-API-Key": "other-key"}).status_code == 200
        assert c.get("/healthz").status_code == 200  # probes stay open


def test_no_configured_keys_disables_writes(root: Path) -> None:
    with TestClient(create_app(Settings(data_root=root))) as c:
        r = c.post("/v1/jobs", json=job_body(), headers=W)
        assert r.status_code == 403 and "disabled" in r.json()["error"]["message"]


def test_keys_from_environment(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    monkeypatch.setenv("B3MINE_API_KEYS", "a1, b2")
    monkeypatch.setenv("B3MINE_DATA_ROOT", str(root))
    s = Settings()
    assert s.key_values() == [b"a1", b"b2"] and s.plans == root.resolve() / "plans"
    assert s.db == root.resolve() / "jobs.sqlite"


# -- dataset references ----------------------------------------------------------------------

@pytest.mark.parametrize("path", ["../outside.parquet", "corpora/../../outside.parquet",
                                  "/etc/passwd", "corpora/../../../../etc/passwd"])
def test_traversal_is_refused(client: TestClient, root: Path, path: str) -> None:
    (root.parent / "outside.parquet").write_bytes(b"x")
    r = client.post("/v1/jobs", json=job_body(path), headers=W)
    assert r.status_code == 403 and error_field(r) == "body.dataset.path"


def test_symlink_out_of_the_root_is_refused(client: TestClient, root: Path,
                                            corpus_path: Path) -> None:
    os.symlink(corpus_path, root / "corpora" / "link.parquet")
    r = client.post("/v1/jobs", json=job_body("corpora/link.parquet"), headers=W)
    assert r.status_code == 403 and error_field(r) == "body.dataset.path"


def test_other_paths_and_urls(client: TestClient, root: Path) -> None:
    for path, code in [("corpora/missing.parquet", 400), ("", 400), ("a\0b", 400),
                       ("s3://bucket/x.parquet", 400), ("file:///etc/passwd", 400)]:
        r = client.post("/v1/jobs", json=job_body(path), headers=W)
        assert r.status_code == code, (path, r.text)
        assert error_field(r) == "body.dataset.path"
    body = job_body()
    body["dataset"]["target_path"] = "../../x"
    r = client.post("/v1/jobs", json=body, headers=W)
    assert r.status_code == 403 and error_field(r) == "body.dataset.target_path"


def test_fsspec_urls_when_enabled(root: Path) -> None:
    with make_client(root, allow_fsspec=True) as c:
        for url in ("file:///etc/passwd", "simplecache::s3://b/x", "local:///etc/passwd"):
            r = c.post("/v1/jobs", json=job_body(url), headers=W)
            assert r.status_code == 403 and error_field(r) == "body.dataset.path", url


# -- invalid input ---------------------------------------------------------------------------

def test_invalid_configs_name_the_field(client: TestClient) -> None:
    r = client.post("/v1/jobs", json=job_body(batch_size=100, cluster_size=16), headers=W)
    assert r.status_code == 422 and error_field(r) == "body.config"
    assert "batch_size" in r.json()["error"]["message"]
    r = client.post("/v1/jobs", json=job_body(batch_size=-1), headers=W)
    assert r.status_code == 422 and error_field(r) == "body.config.batch_size"
    r = client.post("/v1/jobs", json=job_body(bogus=1), headers=W)
    assert r.status_code == 422 and error_field(r) == "body.config.bogus"
    r = client.post("/v1/jobs", json={"config": {}}, headers=W)
    assert r.status_code == 422 and error_field(r) == "body.dataset"
    r = client.post("/v1/jobs", content=b"{not json", headers={**W, "Content-Type":
                                                                "application/json"})
    assert r.status_code == 422


def test_unknown_things_are_404(client: TestClient, small_plan: BatchPlan) -> None:
    pid = small_plan.plan_id
    cases = [("/v1/plans/nope", "path.plan_id"), ("/v1/plans/..", None),
             (f"/v1/plans/{pid}/epochs/9/batches", "path.epoch"),
             (f"/v1/plans/{pid}/epochs/0/batches/999999", "path.batch"),
             ("/v1/jobs/unknown", "path.job_id")]
    for url, field in cases:
        r = client.get(url, headers=W)
        assert r.status_code == 404, (url, r.text)
        if field:
            assert error_field(r) == field
    r = client.get(f"/v1/plans/{pid}/epochs/-1/batches")
    assert r.status_code == 422 and error_field(r) == "path.epoch"


def test_out_of_range_pages(client: TestClient, small_plan: BatchPlan) -> None:
    base = f"/v1/plans/{small_plan.plan_id}/epochs/0/batches"
    n = small_plan.batches_per_epoch
    r = client.get(base, params={"start": n})
    assert r.status_code == 400 and error_field(r) == "query.start"
    r = client.get(base, params={"limit": 0})
    assert r.status_code == 422 and error_field(r) == "query.limit"
    r = client.get(base, params={"limit": 1001})
    assert r.status_code == 400 and error_field(r) == "query.limit"
    r = client.get(base, params={"start": 10**40})
    assert r.status_code == 422 and error_field(r) == "query.start"


# -- plans, pages, batches -------------------------------------------------------------------

def test_plan_list_and_detail(client: TestClient, small_plan: BatchPlan) -> None:
    plans = client.get("/v1/plans").json()["plans"]
    assert [p["plan_id"] for p in plans] == [small_plan.plan_id]
    detail = client.get(f"/v1/plans/{small_plan.plan_id}").json()
    assert detail["manifest"]["counts"]["batches_per_epoch"] == small_plan.batches_per_epoch
    assert "quality" in detail["manifest"]["stats"] and detail["report"] is not None


def test_batch_and_rank_slices(client: TestClient, small_plan: BatchPlan) -> None:
    url = f"/v1/plans/{small_plan.plan_id}/epochs/1/batches/2"
    whole = client.get(url).json()
    expect = small_plan.batch_table(1, 2)
    assert whole["rows"] == expect.column("row").to_pylist()
    assert whole["ids"] == expect.column("id").to_pylist()
    assert whole["clusters"] == expect.column("cluster").to_pylist()
    assert whole["negatives"] == [[n for n in r if n >= 0] for r in
                                  small_plan.negatives_for(np.array(whole["rows"])).tolist()]
    parts = [client.get(url, params={"rank": r, "world_size": 4}).json() for r in range(4)]
    assert sum((p["rows"] for p in parts), []) == whole["rows"]
    assert sum((p["negatives"] for p in parts), []) == whole["negatives"]
    assert parts[1]["positions"] == [32, 64]
    for params, field in [({"rank": 0, "world_size": 3}, "query.world_size"),
                          ({"rank": 4, "world_size": 4}, "query.rank"),
                          ({"rank": 0}, "query.world_size"), ({"world_size": 2}, "query.rank")]:
        r = client.get(url, params=params)
        assert r.status_code == 400 and error_field(r) == field, params
    arrow = pa.ipc.open_stream(client.get(url, params={"rank": 1, "world_size": 2},
                                          headers=ARROW).content).read_all()
    assert arrow.column("row").to_pylist() == whole["rows"][64:]


def test_json_pages_follow_next(client: TestClient, small_plan: BatchPlan) -> None:
    url = f"/v1/plans/{small_plan.plan_id}/epochs/0/batches?limit=4"
    rows = []
    while url:
        page = client.get(url).json()
        rows += [b["rows"] for b in page["batches"]]
        url = page["next"]
    assert np.array_equal(np.array(rows), small_plan.batch_rows(0))


def test_etags(client: TestClient, small_plan: BatchPlan) -> None:
    pid = small_plan.plan_id
    for url, headers in [(f"/v1/plans/{pid}", {}), (f"/v1/plans/{pid}/epochs/0/batches", {}),
                         (f"/v1/plans/{pid}/epochs/0/batches", ARROW),
                         (f"/v1/plans/{pid}/epochs/0/batches/1", {})]:
        first = client.get(url, headers=headers)
        tag = first.headers["ETag"]
        assert tag.startswith('"') and not tag.startswith("W/")
        assert "immutable" in first.headers["Cache-Control"]
        for inm in (tag, f'"zzz", {tag}', f"W/{tag}", "*"):
            again = client.get(url, headers={**headers, "If-None-Match": inm})
            assert again.status_code == 304 and again.content == b""
            assert again.headers["ETag"] == tag
        assert client.get(url, headers={**headers, "If-None-Match": '"other"'}).status_code == 200
    tags = {client.get(f"/v1/plans/{pid}/epochs/0/batches", params=p, headers=h).headers["ETag"]
            for p, h in [({}, {}), ({}, ARROW), ({"start": 1}, {}), ({"limit": 2}, {})]}
    assert len(tags) == 4
    # a 304 only once the request is known valid
    r = client.get(f"/v1/plans/{pid}/epochs/7/batches", headers={"If-None-Match": "*"})
    assert r.status_code == 404


def test_ops_endpoints(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    client.get("/v1/plans/nope")
    text = client.get("/metrics").text
    assert 'b3mine_http_requests_total{method="GET",route="/v1/plans/{plan_id}",status="404"}' \
        in text
    assert 'b3mine_jobs{state="queued"}' in text


# -- jobs: dedup and cancellation --------------------------------------------------------------

def test_resubmission_and_cancellation(root: Path) -> None:
    hold, entered = threading.Event(), threading.Event()

    def hook(job_id: str, stage: str, fraction: float) -> None:
        entered.set()
        hold.wait(30)

    settings = Settings(data_root=root, api_keys=[KEY], job_workers=1)
    with TestClient(create_app(settings, progress_hook=hook)) as c:
        a = c.post("/v1/jobs", json=job_body(seed=1), headers=W)
        assert a.status_code == 202 and a.headers["Location"] == f"/v1/jobs/{a.json()['id']}"
        assert entered.wait(20)
        again = c.post("/v1/jobs", json=job_body(seed=1), headers=W)
        assert again.status_code == 202 and again.json()["id"] == a.json()["id"]
        b = c.post("/v1/jobs", json=job_body(seed=2), headers=W).json()
        assert b["state"] == "queued"  # the only worker is busy with a
        r = c.delete(f"/v1/jobs/{b['id']}", headers=W)
        assert r.status_code == 200 and r.json()["state"] == "cancelled"
        r = c.delete(f"/v1/jobs/{a.json()['id']}", headers=W)
        assert r.status_code == 202 and r.json()["cancel_requested"]
        hold.set()
        job = poll(c, a.json()["id"], {"cancelled"})
        assert job["error"] == "cancelled by request"
        listed = c.get("/v1/jobs", params={"state": "cancelled"}, headers=W).json()["jobs"]
        assert {j["id"] for j in listed} == {a.json()["id"], b["id"]}
        # a cancelled job submitted again is queued again, and this time runs to the end
        hold.set()
        r = c.post("/v1/jobs", json=job_body(seed=2), headers=W)
        assert r.status_code == 202 and r.json()["id"] == b["id"]
        done = poll(c, b["id"], {"succeeded", "failed"})
        assert done["state"] == "succeeded" and done["plan_id"], done
        r = c.post("/v1/jobs", json=job_body(seed=2), headers=W)
        assert r.status_code == 200 and r.json()["plan_id"] == done["plan_id"]
        assert c.delete(f"/v1/jobs/{b['id']}", headers=W).status_code == 409


def test_job_progress_is_overall_with_the_stage_beside_it(root: Path) -> None:
    seen: list[tuple[str, str | None, float]] = []
    settings = Settings(data_root=root, api_keys=[KEY], job_workers=1)
    registry = JobRegistry(settings.db)

    def hook(job_id: str, stage: str, fraction: float) -> None:
        row = registry.get(job_id)
        seen.append((stage, row.stage, row.progress))

    with TestClient(create_app(settings, progress_hook=hook)) as c:
        job = c.post("/v1/jobs", json=job_body(seed=11, negatives={"mode": "hnps"}),
                     headers=W).json()
        assert poll(c, job["id"], {"succeeded", "failed"})["state"] == "succeeded"
    registry.close()
    progress = [p for _, _, p in seen]
    assert progress == sorted(progress) and progress[-1] == 1.0  # never restarts at 0
    stages = [s for _, s, _ in seen]
    assert [s for i, s in enumerate(stages) if i == 0 or s != stages[i - 1]] == [
        "start", "load", "neighbours", "graph", "clusters", "batches", "negatives", "report",
        "write"]
    at = {stage: p for stage, _, p in seen if stage != "start"}  # the last value per stage
    assert 0 < at["load"] < at["neighbours"] < at["graph"] < at["clusters"] < at["write"]


def poll(c, job_id: str, states: set[str], timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = c.get(f"/v1/jobs/{job_id}", headers=W).json()
        if job["state"] in states:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} stuck in {job}")


# -- units -----------------------------------------------------------------------------------

def test_rank_slice() -> None:
    assert rank_slice(1024, 0, 1) == slice(0, 1024)
    assert [rank_slice(12, r, 3) for r in range(3)] == [slice(0, 4), slice(4, 8), slice(8, 12)]
    for args, field in [((10, 0, 3), "world_size"), ((10, 2, 2), "rank"),
                        ((10, -1, 2), "rank"), ((10, 0, 0), "world_size")]:
        with pytest.raises(ShardError) as info:
            rank_slice(*args)
        assert info.value.field == field


def test_owner_liveness() -> None:
    import socket

    me = f"{socket.gethostname()}:{os.getpid()}:boot-a"
    assert not owner_is_orphaned(me, me)
    assert owner_is_orphaned(f"{socket.gethostname()}:{os.getpid()}:boot-b", me)  # earlier life
    assert owner_is_orphaned(f"{socket.gethostname()}:{2**22 + 7}:x", me)  # no such pid
    assert not owner_is_orphaned(f"{socket.gethostname()}:1:x", me)  # a live sibling
    assert owner_is_orphaned("elsewhere:1:x", me) and owner_is_orphaned(None, me)


def test_registry_recovery_of_a_crashed_row(tmp_path: Path) -> None:
    reg = JobRegistry(tmp_path / "jobs.sqlite")
    reg.submit("j1", "{}", "{}", "local")
    assert reg.claim("j1", "host:4194311:dead") is not None
    reg.submit("j2", "{}", "{}", "local")
    failed, queued = reg.recover(f"otherhost:{os.getpid()}:me")
    assert failed == ["j1"] and queued == ["j2"]
    job = reg.get("j1")
    assert job.state == "failed" and job.error == "service restarted while running"
    # the dead owner's late writes are ignored
    assert not reg.finish("j1", "host:4194311:dead", "succeeded", plan_id="x")
    reg.close()
