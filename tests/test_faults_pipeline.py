"""Fault cases of the Dask engine (issue 15) on a real LocalCluster: the core's checks come
before any task (one place for CLI, API and every engine), a failed load leaves no sparse
work directory, orphaned work directories of dead jobs are removed, live ones kept."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("distributed")

from distributed import Client, LocalCluster  # noqa: E402

from b3mine.errors import InputError, PlanError  # noqa: E402
from b3mine.writers import writer_lock  # noqa: E402
from pipelines.checkpoints import WorkDir  # noqa: E402
from pipelines.engine import StageError, run_job  # noqa: E402

from tests.conftest import write_embeddings  # noqa: E402

SMALL = {"batch_size": 32, "cluster_size": 16, "p": 1, "m": 5}


@pytest.fixture(scope="module")
def client():
    cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                           dashboard_address=":0")
    with Client(cluster) as c:
        yield c
    cluster.close()


def test_window_and_output_checks_are_the_cores(tmp_path, corpus_path, client):
    with pytest.raises(StageError) as info:
        run_job(corpus_path, {**SMALL, "p": 1999}, tmp_path / "plans", client=client)
    assert isinstance(info.value.cause, InputError)
    assert "rank window" in str(info.value) and "p + m <= 2000 rows" in str(info.value)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(PlanError, match="a parent is a file"):
        run_job(corpus_path, SMALL, blocker / "plans", client=client)


def test_failed_load_leaves_no_work_dir_and_orphans_are_cleaned(tmp_path, client):
    x = np.ones((400, 8), np.float32)
    x[333, 5] = np.nan
    bad = write_embeddings(tmp_path / "bad.parquet", np.arange(400), x)
    out = tmp_path / "plans"
    work = out / ".work"
    work.mkdir(parents=True)
    (work / "deadjob").mkdir()  # a killed load: no lock holder, load never finished
    (work / "deadjob" / "queries.npy").write_bytes(b"\0" * 1024)
    finished = WorkDir(work / "resumable")
    finished.root.mkdir()
    finished.mark_done("load", {"n_rows": 1})  # a failed later stage: kept for resume
    with writer_lock(work / "livejob.lock"):
        (work / "livejob").mkdir()
        with pytest.raises(StageError, match="nothing to resume"):
            run_job(bad, SMALL, out, client=client, shard_rows=100, retries=0)
        left = sorted(p.name for p in work.iterdir() if p.is_dir())
    assert left == ["livejob", "resumable"], left
