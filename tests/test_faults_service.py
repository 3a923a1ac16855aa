"""Fault and abuse cases of the service (issue 15), on a real uvicorn on 127.0.0.1 over real
SQLite files: symlinks out of the data root, over-long names, non-finite numbers, oversized
bodies and plans, SQLite faults (read-only, deleted under the server), a killed mining process,
keyed job reads and server paths in errors. No case may answer 5xx except the registry's 503."""
from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.app import create_app
from service.settings import Settings
from service.testing import UvicornThread, populate_data_root

from tests.conftest import write_embeddings

KEY = "faults-key"
W = {"X-API-Key": KEY}
CONFIG = {"batch_size": 128, "cluster_size": 16, "p": 3, "m": 20, "seed": 5}


def job(path: str = "corpora/corpus.parquet", **extra) -> dict:
    return {"dataset": {"path": path}, "config": {**CONFIG, **extra}}


def wait(c: httpx.Client, job_id: str, states=("succeeded", "failed", "cancelled"),
         timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = c.get(f"/v1/jobs/{job_id}")
        if r.status_code == 200 and r.json()["state"] in states:
            return r.json()
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached {states}")


@pytest.fixture()
def settings(tmp_path: Path, corpus_path: Path) -> Settings:
    populate_data_root(tmp_path / "data", corpus_path)
    return Settings(data_root=tmp_path / "data", api_keys=[KEY], max_body_bytes=16384,
                    max_plan_rows=50_000)


@pytest.fixture()
def server(settings):
    with UvicornThread(create_app(settings)) as s:
        yield s


@pytest.fixture()
def c(server):
    with httpx.Client(base_url=server.url, timeout=30, headers=W) as client:
        yield client


def test_symlinked_file_inside_an_allowed_directory_is_refused(c, settings, tmp_path):
    outside = write_embeddings(tmp_path / "outside.parquet", np.arange(200),
                               np.eye(200, 8, dtype=np.float32) + 0.1)
    d = settings.data_root / "corpora" / "dir"
    d.mkdir()
    os.symlink(settings.data_root / "corpora" / "corpus.parquet", d / "a.parquet")  # inside
    os.symlink(outside, d / "b.parquet")
    r = c.post("/v1/jobs", json=job("corpora/dir"))
    assert r.status_code == 403, r.text
    assert "b.parquet resolves outside the data root" in r.json()["error"]["message"]
    assert str(tmp_path) not in r.text


def test_symlink_planted_after_submission_is_caught_before_mining(settings, tmp_path):
    """The runner re-checks the stored source just before mining (check_source_under_root)."""
    from b3mine.config import EmbeddingSource
    from service.datasets import check_source_under_root
    from service.errors import ApiError

    d = settings.data_root / "corpora" / "later"
    d.mkdir()
    os.link(settings.data_root / "corpora" / "corpus.parquet", d / "a.parquet")
    stored = EmbeddingSource(path="corpora/later")
    check_source_under_root(stored, settings)  # fine at submission
    os.symlink(write_embeddings(tmp_path / "x.parquet", np.arange(3), np.ones((3, 2), "f4")),
               d / "z.parquet")
    with pytest.raises(ApiError, match="z.parquet resolves outside"):
        check_source_under_root(stored, settings)


@pytest.mark.parametrize("path,needle", [
    ("corpora/" + "x" * 256 + ".parquet", "longer than 255 bytes"),
    ("/".join(["y" * 200] * 25), "PATH_MAX"),
])
def test_over_long_names_are_400(c, path, needle):
    r = c.post("/v1/jobs", json=job(path))
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"]


def test_non_finite_numbers_in_the_body_are_422(c):
    raw = ('{"dataset": {"path": "corpora/corpus.parquet"}, "config": {"batch_size": 128, '
           '"cluster_size": 16, "resolution": Infinity}}')
    r = c.post("/v1/jobs", content=raw, headers={**W, "Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"].endswith("resolution")


def test_oversized_bodies_are_413(c, server):
    big = {"dataset": {"path": "corpora/corpus.parquet"}, "config": CONFIG, "pad": "x" * 20000}
    r = c.post("/v1/jobs", json=big)
    assert r.status_code == 413 and "max_body_bytes (16384" in r.text

    def chunks():
        for _ in range(20):
            yield b" " * 1000

    r = c.post("/v1/jobs", content=chunks(), headers={**W, "Content-Type": "application/json"})
    assert r.status_code == 413


def test_a_plan_over_the_limit_is_422_naming_it(c):
    r = c.post("/v1/jobs", json=job(epochs=26))  # 2,000 rows x 26 epochs > 50,000
    assert r.status_code == 422
    assert "max_plan_rows (50000)" in r.json()["error"]["message"]
    assert r.json()["error"]["field"] == "body.config.epochs"


def test_job_reads_need_a_key_plans_stay_public(server):
    with httpx.Client(base_url=server.url) as anon:
        assert anon.get("/v1/jobs").status_code == 401
        assert anon.get("/v1/jobs/x").status_code == 401
        assert anon.get("/v1/plans").status_code == 200


def test_errors_carry_no_server_paths(c, settings):
    x = np.ones((300, 8), np.float32)
    x[17] = 0
    write_embeddings(settings.data_root / "corpora" / "zero.parquet", np.arange(300), x)
    done = wait(c, c.post("/v1/jobs", json=job("corpora/zero.parquet")).json()["id"])
    assert done["state"] == "failed"
    assert "row 17" in done["error"] and "corpora/zero.parquet" in done["error"]
    assert str(settings.data_root) not in done["error"]


def test_readonly_registry_is_503_and_retried_never_stuck(settings):
    hold, entered = threading.Event(), threading.Event()

    def hook(job_id: str, stage: str, fraction: float) -> None:
        if stage == "graph":
            entered.set()
            hold.wait(30)

    app = create_app(settings, progress_hook=hook)
    registry = app.state.ctx.registry
    with UvicornThread(app) as s, httpx.Client(base_url=s.url, timeout=30, headers=W) as c:
        running = c.post("/v1/jobs", json=job()).json()["id"]
        assert entered.wait(60)
        registry._conn.execute("PRAGMA query_only = 1")  # SQLite refuses every write now
        assert c.get("/readyz").status_code == 503
        r = c.post("/v1/jobs", json=job(seed=99))
        assert r.status_code == 503 and r.headers["Retry-After"] == "5"
        assert c.delete(f"/v1/jobs/{running}").status_code == 503
        hold.set()  # the job finishes while its writes fail: the runner retries them
        time.sleep(1.0)
        assert c.get(f"/v1/jobs/{running}").json()["state"] == "running"
        registry._conn.execute("PRAGMA query_only = 0")
        assert wait(c, running)["state"] == "succeeded"
        assert c.get("/readyz").status_code == 200


def test_registry_deleted_under_the_server_is_restored(settings):
    with UvicornThread(create_app(settings)) as s, \
            httpx.Client(base_url=s.url, timeout=30, headers=W) as c:
        first = wait(c, c.post("/v1/jobs", json=job()).json()["id"])
        assert first["state"] == "succeeded"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{settings.db}{suffix}").unlink(missing_ok=True)
        assert c.get("/readyz").status_code == 200  # restored from the open connection
        second = wait(c, c.post("/v1/jobs", json=job(seed=6)).json()["id"])
        assert second["state"] == "succeeded"
    with UvicornThread(create_app(settings)) as s, \
            httpx.Client(base_url=s.url, timeout=30, headers=W) as c:  # a restart
        ids = {j["id"] for j in c.get("/v1/jobs").json()["jobs"]}
        assert {first["id"], second["id"]} <= ids


def test_registry_replaced_under_the_server_is_503(settings):
    with UvicornThread(create_app(settings)) as s, \
            httpx.Client(base_url=s.url, timeout=30, headers=W) as c:
        assert c.get("/readyz").status_code == 200
        os.replace(settings.db, settings.db.with_suffix(".old"))
        settings.db.write_bytes(b"")
        r = c.get("/readyz")
        assert r.status_code == 503 and "replaced" in r.text
        assert c.post("/v1/jobs", json=job()).status_code == 503


def signal_at(stage: str):
    """A progress hook that sets an event once a job reaches ``stage`` (and never blocks)."""
    entered = threading.Event()

    def hook(job_id: str, st: str, fraction: float) -> None:
        if st == stage:
            entered.set()

    return entered, hook


def test_killed_mining_process_fails_the_job(settings):
    entered, hook = signal_at("neighbours")
    with UvicornThread(create_app(settings, progress_hook=hook)) as s, \
            httpx.Client(base_url=s.url, timeout=30, headers=W) as c:
        running = c.post("/v1/jobs", json=job(seed=8)).json()["id"]
        assert entered.wait(60)
        children = [p for p in multiprocessing.active_children() if p.name == "b3mine-mine"]
        assert len(children) == 1 and children[0].pid != os.getpid()  # mined out of process
        os.kill(children[0].pid, signal.SIGKILL)
        done = wait(c, running)
        assert done["state"] == "failed" and "exited with code -9" in done["error"]
        assert c.get("/healthz").status_code == 200


def test_cancel_kills_the_mining_process(settings):
    entered, hook = signal_at("neighbours")
    with UvicornThread(create_app(settings, progress_hook=hook)) as s, \
            httpx.Client(base_url=s.url, timeout=30, headers=W) as c:
        running = c.post("/v1/jobs", json=job(seed=9, epochs=3)).json()["id"]
        assert entered.wait(60)
        child = next(p for p in multiprocessing.active_children() if p.name == "b3mine-mine")
        assert c.delete(f"/v1/jobs/{running}").status_code in (200, 202)
        done = wait(c, running)
        assert done["state"] in ("cancelled", "succeeded")  # it may have finished first
        child.join(10)
        assert not child.is_alive()
