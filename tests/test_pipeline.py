"""The Dask engine on a real LocalCluster (worker processes): same plan as in-process, survives a
killed worker, resumes after a failed stage. Small inputs (2,000 x 32) keep it to ~1 minute."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

pytest.importorskip("distributed")
pytest.importorskip("faiss")

from distributed import Client, LocalCluster, WorkerPlugin  # noqa: E402

from b3mine.config import EmbeddingSource, MiningConfig, NegativesConfig, NeighbourConfig  # noqa: E402,E501
from b3mine.errors import InputError  # noqa: E402
from b3mine.graph import window_graph  # noqa: E402
from b3mine.mining import mine as local_mine  # noqa: E402
from b3mine.plan import BatchPlan  # noqa: E402
from pipelines import read_progress  # noqa: E402
from pipelines.checkpoints import WorkDir  # noqa: E402
from pipelines.engine import DELAY_ENV, FAIL_ENV, StageError, job_id_for, run_job  # noqa: E402
from pipelines import stages  # noqa: E402
from pipelines.stages import INDEX_CACHE, plan_source, read_graph  # noqa: E402

from tests.conftest import clustered_vectors  # noqa: E402

pytestmark = pytest.mark.slow

PLAN_FILES = ("clusters.parquet", "batches.parquet", "negatives.parquet", "report.json")


def _cluster() -> tuple[LocalCluster, Client]:
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                           dashboard_address=":0")
    return cluster, Client(cluster)


@pytest.fixture(scope="module")
def client():
    cluster, c = _cluster()
    yield c
    c.close()
    cluster.close()


def assert_same_plan(a: BatchPlan, b: BatchPlan) -> None:
    assert a.plan_id == b.plan_id
    assert a.manifest.counts == b.manifest.counts
    for name in PLAN_FILES:
        assert a.manifest.files.get(name) == b.manifest.files.get(name), name
    for e in range(a.epochs):
        np.testing.assert_array_equal(a.batch_rows(e), b.batch_rows(e))


def test_same_plan_as_in_process(tmp_path, corpus_path, small_config, small_plan, client):
    result = run_job(corpus_path, small_config, tmp_path, client=client, shard_rows=300)
    assert set(result.stages.values()) == {"ran"}
    result.plan.validate()
    assert_same_plan(small_plan, result.plan)
    # the work directory is removed, and the job record says where the plan is
    assert not (tmp_path / ".work" / result.job_id).exists()
    done = read_progress(tmp_path, result.job_id)
    assert done["state"] == "done" and done["plan_id"] == result.plan.plan_id
    # same job again: nothing recomputed
    again = run_job(corpus_path, small_config, tmp_path, client=client)
    assert set(again.stages.values()) == {"cached"} and again.plan.path == result.plan.path


def test_scheduler_address_and_corpus_shards(tmp_path, corpus_path, small_config, small_plan,
                                             client):
    """Connect by address (an existing cluster) and shard the corpus as well as the queries."""
    address = client.scheduler.address
    result = run_job(corpus_path, small_config, tmp_path, scheduler=address, target_shards=3)
    assert_same_plan(small_plan, result.plan)


def test_graph_checkpoint_round_trip(tmp_path):
    import pyarrow as pa
    import scipy.sparse as sp

    from pipelines.checkpoints import write_parquet

    rng = np.random.default_rng(0)
    g = window_graph(rng.integers(-1, 300, size=(300, 12)), mutual=False)
    upper = sp.triu(g, k=1).tocoo()
    work = WorkDir(tmp_path)
    write_parquet(work.path("graph.parquet"), pa.table({"src": upper.row.astype(np.int64),
                                                        "dst": upper.col.astype(np.int64)}))
    back = read_graph(work, 300)
    assert back.dtype == g.dtype
    for attr in ("indptr", "indices", "data"):
        np.testing.assert_array_equal(getattr(back, attr), getattr(g, attr))


def _index_loads() -> tuple[int, int]:
    """(runs on a worker) indexes this worker process loaded so far, and still holds"""
    return INDEX_CACHE.loads, len(INDEX_CACHE._items)


def test_ivf_index_built_once_and_loaded_once_per_worker(tmp_path, corpus_path, client,
                                                          monkeypatch):
    cfg = MiningConfig(batch_size=128, cluster_size=16, p=3, m=20, seed=1,
                       neighbours=NeighbourConfig(index="ivf", nlist=20, nprobe=20,
                                                  block_size=250))
    monkeypatch.setattr(stages, "IVF_FILL_ROWS", 600)  # the client cuts 4 fill tasks
    before = client.run(_index_loads)
    result = run_job(corpus_path, cfg, tmp_path, client=client, keep_work=True)
    result.plan.validate()
    work = tmp_path / ".work" / result.job_id
    assert (work / "index.faiss").is_file()
    # merged on disk; the filled parts (a copy of the corpus) are gone, each range's coarse
    # lists (what the search scans) are kept
    assert sorted(p.name for p in (work / "ivf").iterdir()) == [
        f"lists-{a:012d}-{b:012d}.npy" for a, b in ((0, 600), (600, 1200), (1200, 1800),
                                                    (1800, 2000))] + ["lists.ivfdata",
                                                                      "trained.faiss"]
    # 8 blocks over 2 workers: each worker that searched loaded the index exactly once
    loads = {w: n - before.get(w, (0, 0))[0] for w, (n, _) in client.run(_index_loads).items()}
    assert max(loads.values()) == 1 and sum(loads.values()) >= 1
    # released after the stage: later single-task stages get the memory back
    assert all(held == 0 for _, held in client.run(_index_loads).values())
    # nprobe = nlist: IVF is exhaustive here, so the plan is the in-process one
    assert_same_plan(local_mine(corpus_path, cfg, tmp_path / "local"), result.plan)


def test_ivf_built_in_parts_is_the_core_index(tmp_path, monkeypatch):
    """Trained once, filled by row ranges, merged on disk: the same lists, so the same search
    results as the core's one-shot `build_index` (nprobe < nlist, one thread for both)."""
    import faiss

    from b3mine.neighbours import build_index, search_index

    x = clustered_vectors(3000, 16, 12, seed=4)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    np.save(tmp_path / "queries.npy", x)
    cfg = MiningConfig(batch_size=64, cluster_size=8,
                       neighbours=NeighbourConfig(index="ivf", nlist=30, nprobe=3, threads=1))
    monkeypatch.setattr(stages, "IVF_FILL_ROWS", 700)
    stages.train_ivf_task(str(tmp_path), cfg)
    ranges = stages.ivf_fill_ranges(len(x))
    assert len(ranges) == 5
    for a, b in ranges:
        stages.fill_ivf_task(str(tmp_path), a, b)
    stages.merge_ivf_task(str(tmp_path), ranges)
    parts = faiss.read_index(str(tmp_path / "index.faiss"))
    parts.nprobe = 3
    whole = build_index(x, 40, cfg.neighbours)
    for got, want in zip(parts.search(x[:400], 40), whole.search(x[:400], 40)):
        np.testing.assert_array_equal(got, want)
    # the fill tasks' saved coarse lists are each row's top nprobe, nearest first, so the
    # search that uses them (rows 650..1450 span two fill ranges) is the one that computes them
    work = WorkDir(str(tmp_path))
    lists = stages._query_lists(work, cfg, 650, 1450)
    np.testing.assert_array_equal(lists, whole.quantizer.search(x[650:1450], 3)[1])
    got = stages._search(work, cfg, 650, 1450, 40)
    want = search_index(whole, x[650:1450], 40, 256, targets=x)
    np.testing.assert_array_equal(got.rows, want.rows)
    np.testing.assert_array_equal(got.scores, want.scores)


def test_bad_input_names_the_stage_and_global_row(tmp_path, client):
    x = clustered_vectors(400, 8, 4, seed=2)
    x[333, 5] = np.nan
    path = tmp_path / "bad.parquet"
    import pyarrow as pa

    table = pa.table({"id": np.arange(400),
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 8)})
    pq.write_table(table, path, row_group_size=100)  # the bad row lies in the 4th shard
    cfg = MiningConfig(batch_size=32, cluster_size=16, p=1, m=5)
    with pytest.raises(StageError) as info:
        run_job(path, cfg, tmp_path / "plans", client=client, shard_rows=100, retries=0)
    assert info.value.stage == "load"
    assert "column 'embedding', row 333" in str(info.value) and "NaN" in str(info.value)


def _grouped_parquet(path, ids, x, group=100):
    import pyarrow as pa

    table = pa.table({"id": ids, "embedding": pa.FixedSizeListArray.from_arrays(
        pa.array(x.reshape(-1)), x.shape[1])})
    pq.write_table(table, path, row_group_size=group)
    return path


def test_id_checks_span_shards_and_buckets(tmp_path, client, monkeypatch):
    """Id uniqueness is a partitioned check (hash buckets over every shard's ids, no task
    holds them all): duplicates split across shards get the core loader's message, the
    smallest duplicated id first; a null id names its row in the whole input."""
    from b3mine.embeddings import load_embeddings

    monkeypatch.setattr(stages, "ID_BUCKET_ROWS", 90)  # 7 buckets for 600 rows
    x = clustered_vectors(600, 8, 4, seed=1)
    ids = [f"doc-{i}" for i in range(600)]
    ids[450], ids[590] = ids[130], ids[20]  # both cross shards; 'doc-130' sorts first
    path = _grouped_parquet(tmp_path / "dup.parquet", ids, x)
    cfg = MiningConfig(batch_size=32, cluster_size=16, p=1, m=5)
    with pytest.raises(InputError) as core:
        load_embeddings(path)
    with pytest.raises(StageError) as info:
        run_job(path, cfg, tmp_path / "plans", client=client, shard_rows=100, retries=0)
    assert info.value.stage == "load" and str(info.value.cause) == str(core.value)
    assert "row 450: duplicate id 'doc-130', first seen at row 130" in str(core.value)

    ints = np.arange(600)
    ints[599] = 7
    path = _grouped_parquet(tmp_path / "dup-int.parquet", ints, x)
    with pytest.raises(StageError, match=r"row 599: duplicate id 7, first seen at row 7"):
        run_job(path, cfg, tmp_path / "plans", client=client, shard_rows=100, retries=0)

    path = _grouped_parquet(tmp_path / "null.parquet", [*range(432), None, *range(433, 600)], x)
    with pytest.raises(StageError, match=r"column 'id', row 432: null id"):
        run_job(path, cfg, tmp_path / "plans", client=client, shard_rows=100, retries=0)


def test_npy_ids_are_read_by_shard(tmp_path, client, monkeypatch):
    """.npy input: each shard reads its slice of the id file (.npy or text), the plan is the
    in-process one, and a misaligned id file is refused before any vector is read."""
    monkeypatch.setattr(stages, "ID_BUCKET_ROWS", 128)
    x = clustered_vectors(500, 16, 8, seed=4)
    np.save(tmp_path / "q.npy", x)
    np.save(tmp_path / "ids.npy", np.arange(1000, 1500))
    cfg = MiningConfig(batch_size=64, cluster_size=16, p=2, m=10)
    src = EmbeddingSource(path=str(tmp_path / "q.npy"), ids_path=str(tmp_path / "ids.npy"))
    result = run_job(src, cfg, tmp_path / "dask", client=client, shard_rows=128)
    assert_same_plan(local_mine(src, cfg, tmp_path / "local"), result.plan)  # ids: fingerprint

    np.save(tmp_path / "short.npy", np.arange(499))
    (tmp_path / "short.txt").write_text("\n".join(map(str, range(501))))
    for name, got in (("short.npy", "got 499"), ("short.txt", "got 501")):
        bad = EmbeddingSource(path=str(tmp_path / "q.npy"), ids_path=str(tmp_path / name))
        with pytest.raises(InputError, match=f"not aligned .*expected 500 ids, {got}"):
            plan_source(bad, shard_rows=128)


def test_failed_stage_resumes_from_checkpoints(tmp_path, corpus_path, small_config, small_plan,
                                               client, monkeypatch):
    monkeypatch.setenv(FAIL_ENV, "clusters")
    with pytest.raises(StageError) as info:
        run_job(corpus_path, small_config, tmp_path, client=client, retries=0)
    assert info.value.stage == "clusters" and "clusters" in str(info.value)
    job_id = job_id_for(corpus_path, small_config)
    work = WorkDir(tmp_path / ".work" / job_id)
    assert [s for s in ("load", "neighbours", "graph", "clusters") if work.is_done(s)] == \
        ["load", "neighbours", "graph"]
    assert (work.path("graph.parquet")).is_file()
    failed = read_progress(tmp_path, job_id)
    assert failed["state"] == "failed" and failed["failed_stage"] == "clusters"
    assert not any(p.name != ".work" for p in tmp_path.iterdir())  # no plan, not even partial
    before = {s: work.marker(s).stat().st_mtime_ns for s in ("load", "neighbours", "graph")}

    monkeypatch.delenv(FAIL_ENV)
    result = run_job(corpus_path, small_config, tmp_path, client=client, keep_work=True)
    assert result.stages == {"load": "skipped", "neighbours": "skipped", "graph": "skipped",
                             "clusters": "ran", "batches": "ran", "negatives": "ran",
                             "write": "ran"}
    assert {s: work.marker(s).stat().st_mtime_ns for s in before} == before
    result.plan.validate()
    assert_same_plan(small_plan, result.plan)
    # The resumed run says what it skipped, and reports only the times of what it ran.
    stats = result.plan.manifest.stats
    assert stats["skipped_stages"] == ["load", "neighbours", "graph"]
    assert set(stats["timings"]) == {"clusters", "batches", "negatives", "report"}
    assert set(result.timings) == {"clusters", "batches", "negatives", "write"}
    from tests.test_cli import report_text

    text = report_text(monkeypatch, result.plan.path)
    assert "skipped load, neighbours, graph: done by an earlier run of this job" in text
    assert "seconds (this run)" in text and "neighbours 0" not in text


def test_worker_killed_during_neighbours(tmp_path, corpus_path, monkeypatch):
    """SIGKILL a worker process while neighbour blocks run: Dask re-runs its tasks on the
    restarted worker and the plan is valid and identical to the in-process one."""
    cfg = MiningConfig(batch_size=128, cluster_size=16, p=3, m=20, seed=3,
                       negatives=NegativesConfig(mode="hnips", k=2),
                       neighbours=NeighbourConfig(block_size=100))  # 20 blocks
    expected = local_mine(corpus_path, cfg, tmp_path / "local")
    monkeypatch.setenv(DELAY_ENV, "0.3")  # ~3 s of neighbour stage on 2 workers
    cluster, client = _cluster()
    try:
        pids = client.run(os.getpid)
        victim = sorted(pids.values())[0]
        killed: list[float] = []

        def kill_once(stage: str, fraction: float) -> None:
            if stage == "neighbours" and 0 < fraction < 0.5 and not killed:
                os.kill(victim, signal.SIGKILL)
                killed.append(fraction)

        result = run_job(corpus_path, cfg, tmp_path / "dask", client=client, progress=kill_once,
                         keep_work=True)
        assert killed, "the neighbour stage finished before a worker could be killed"
        assert victim not in client.run(os.getpid).values()  # it really died (and was replaced)
        assert result.stages["neighbours"] == "ran"
        result.plan.validate()
        assert_same_plan(expected, result.plan)
        entries = sorted(p.name for p in
                         (tmp_path / "dask" / ".work" / result.job_id / "neighbours").iterdir())
        # one finished part per block; a killed task may leave only hidden temporaries (or
        # their locks) that the next start cleans
        parts = [n for n in entries if n.endswith(".parquet") and not n.startswith(".")]
        assert len(parts) == 20, entries
    finally:
        client.close()
        cluster.close()


def test_cli_dask_engine(tmp_path, corpus_path, client):
    env = {**os.environ, "DASK_SCHEDULER_ADDRESS": client.scheduler.address}
    cmd = [sys.executable, "-c", "from b3mine.cli import main; main()", "mine",
           "--embeddings", str(corpus_path), "--out", str(tmp_path), "--batch-size", "128",
           "--cluster-size", "16", "--p", "3", "--m", "20", "--engine", "dask"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr + done.stdout
    plans = [p for p in tmp_path.iterdir() if (p / "manifest.json").is_file()]
    assert len(plans) == 1
    manifest = json.loads((plans[0] / "manifest.json").read_text())
    assert manifest["config"]["batch_size"] == 128

    # a failing stage: the CLI names it and exits 2, checkpoints stay
    env[FAIL_ENV] = "graph"
    failed = subprocess.run(cmd + ["--seed", "5"], env=env, capture_output=True, text=True,
                            timeout=240)
    assert failed.returncode == 2
    assert "stage 'graph' failed" in failed.stderr.replace("\n", " ")

    # --region-size: region-parallel on Dask; refused in one line by the in-process engine
    env.pop(FAIL_ENV)
    regions = subprocess.run(cmd + ["--region-size", "800"], env=env, capture_output=True,
                             text=True, timeout=240)
    assert regions.returncode == 0, regions.stderr + regions.stdout
    (manifest,) = [json.loads(p.read_text()) for p in tmp_path.glob("*/manifest.json")
                   if json.loads(p.read_text())["config"]["region_size"] == 800]
    assert manifest["stats"]["graph"]["regions"] >= 3
    local = subprocess.run(cmd[:-2] + ["--region-size", "800"], capture_output=True, text=True,
                           timeout=240)
    assert local.returncode == 2 and "Traceback" not in local.stderr
    assert "runs on the Dask engine only" in local.stderr.replace("\n", " ")


def test_in_memory_embeddings_are_refused(tmp_path):
    from b3mine.embeddings import Embeddings

    emb = Embeddings.from_arrays(np.arange(4), np.eye(4, dtype=np.float32))
    with pytest.raises(TypeError, match="reads embeddings from files"):
        run_job(emb, MiningConfig(batch_size=4, cluster_size=2), tmp_path)


def test_paired_npy_input(tmp_path, client):
    q = clustered_vectors(500, 16, 8, seed=4)
    t = clustered_vectors(500, 16, 8, seed=4, noise=0.6)
    np.save(tmp_path / "q.npy", q)
    np.save(tmp_path / "t.npy", t)
    (tmp_path / "ids.txt").write_text("\n".join(f"doc-{i}" for i in range(500)))
    from b3mine.config import EmbeddingSource

    src = EmbeddingSource(path=str(tmp_path / "q.npy"), target_path=str(tmp_path / "t.npy"),
                          ids_path=str(tmp_path / "ids.txt"))
    cfg = MiningConfig(batch_size=64, cluster_size=16, p=2, m=10,
                       negatives=NegativesConfig(mode="hnps", k=2))
    result = run_job(src, cfg, tmp_path / "dask", client=client, shard_rows=128)
    result.plan.validate()
    assert_same_plan(local_mine(src, cfg, tmp_path / "local"), result.plan)
    assert result.plan.manifest.dataset.paired and result.plan.manifest.dataset.id_type == "string"


def test_unreachable_scheduler_is_a_named_error(tmp_path, corpus_path, small_config):
    import dask

    from pipelines.cluster import ClusterError

    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}), \
            pytest.raises(ClusterError, match="tcp://127.0.0.1:9"):
        run_job(corpus_path, small_config, tmp_path, scheduler="tcp://127.0.0.1:9")


def test_changed_block_size_never_mixes_blocks(tmp_path, corpus_path, client):
    """Part files are named by their row range: a block cut another way is not reused."""
    cfg = MiningConfig(batch_size=128, cluster_size=16, p=3, m=20, seed=2,
                       neighbours=NeighbourConfig(block_size=500))
    first = run_job(corpus_path, cfg, tmp_path, client=client, keep_work=True,
                    blocks_per_task=1)
    work = tmp_path / ".work" / first.job_id
    for marker in ("neighbours", "graph", "clusters", "batches", "negatives", "write"):
        (work / f"{marker}.done").unlink()
    (tmp_path / ".work" / f"{first.job_id}.json").unlink()  # force a real re-run
    expected = {name: first.plan.manifest.files.get(name) for name in PLAN_FILES}
    import shutil

    shutil.rmtree(tmp_path / first.plan.plan_id)
    again = run_job(corpus_path, cfg, tmp_path, client=client, keep_work=True,
                    blocks_per_task=2)
    meta = json.loads((work / "neighbours.done").read_text())
    assert meta["resumed_blocks"] == 0 and meta["blocks"] == 2
    assert again.stages["load"] == "skipped" and again.stages["neighbours"] == "ran"
    assert {name: again.plan.manifest.files.get(name) for name in PLAN_FILES} == expected


def test_affinity_grouping_same_plan(tmp_path, corpus_path, client):
    """Graph-aware batch grouping reads the graph checkpoint in the batches stage."""
    cfg = MiningConfig(batch_size=128, cluster_size=16, p=3, m=20, seed=4,
                       batch_grouping="affinity")
    result = run_job(corpus_path, cfg, tmp_path / "dask", client=client)
    assert_same_plan(local_mine(corpus_path, cfg, tmp_path / "local"), result.plan)


class SlowExit(WorkerPlugin):
    """A worker that needs 4.5 s to shut down (a busy host, big imports): more than the 4 s
    LocalCluster.close gives it before killing it."""

    name = "slow-exit"

    def teardown(self, worker) -> None:  # noqa: ANN001
        import time

        time.sleep(4.5)


def test_local_cluster_shuts_down_without_killing_workers():
    import logging

    from pipelines.cluster import connect

    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    nanny = logging.getLogger("distributed.nanny")
    nanny.addHandler(handler)
    try:
        with connect(workers=1, threads_per_worker=1) as client:
            client.register_plugin(SlowExit())
            pid = next(iter(client.run(os.getpid).values()))
    finally:
        nanny.removeHandler(handler)
    assert not [line for line in lines if "still alive" in line], lines
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the worker process has exited


def test_dask_loader_names_the_ids_path_flag(tmp_path):
    """The Dask loader refuses .npy input without ids with the core loader's message."""
    np.save(tmp_path / "e.npy", np.ones((4, 3), np.float32))
    with pytest.raises(InputError, match=r"need an aligned id file \(--ids-path"):
        plan_source(EmbeddingSource(path=str(tmp_path / "e.npy")), shard_rows=2)
