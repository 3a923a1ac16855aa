"""Region-parallel mining (``MiningConfig.region_size``) on a real LocalCluster: a valid plan,
deterministic for a seed, regions capped at S, resumable after a killed worker and after a
killed client process."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("distributed")
pytest.importorskip("faiss")

from distributed import Client, LocalCluster

from b3mine import regions as core
from b3mine.config import MiningConfig, NegativesConfig, NeighbourConfig
from b3mine.plan import BatchPlan
from pipelines.checkpoints import WorkDir
from pipelines.engine import DELAY_ENV, job_id_for, run_job

pytestmark = pytest.mark.slow

CONFIG = MiningConfig(batch_size=128, cluster_size=16, p=3, m=20, epochs=2, seed=7,
                      region_size=500, negatives=NegativesConfig(mode="hnps", k=3),
                      neighbours=NeighbourConfig(block_size=250))
PLAN_FILES = ("clusters.parquet", "batches.parquet", "negatives.parquet")


@pytest.fixture(scope="module")
def client():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def region_plan(tmp_path_factory, corpus_path, client):
    out = tmp_path_factory.mktemp("regions")
    return run_job(corpus_path, CONFIG, out, client=client, keep_work=True, report=False)


def same_files(a: BatchPlan, b: BatchPlan) -> None:
    assert a.plan_id == b.plan_id
    for name in PLAN_FILES:
        assert a.manifest.files[name] == b.manifest.files[name], name


def test_region_plan_is_valid_and_covers_rows_once(region_plan, corpus_path):
    plan = region_plan.plan
    plan.validate()
    assert region_plan.stages == {s: "ran" for s in ("load", "neighbours", "regions", "graph",
                                                     "clusters", "batches", "write")}
    c = plan.manifest.counts
    clusters = plan.clusters_table()
    rows = clusters.column("row").to_numpy()
    # 2,000 rows in clusters of 16: 125 clusters, nobody dropped or repeated
    assert c.n_clusters == 125 and c.remainder_dropped == 0 and np.unique(rows).size == 2000
    assert c.batches_per_epoch == 125 // 8
    # every region holds at most S rows, and clusters never mix regions (leftovers aside)
    work = WorkDir(plan.path.parent / ".work" / region_plan.job_id)
    region = np.load(work.path("regions/region.npy"))
    assert np.bincount(region).max() <= CONFIG.region_size
    per_cluster = region[rows.reshape(-1, 16)]
    mixed = (per_cluster != per_cluster[:, :1]).any(axis=1)
    graph = plan.manifest.stats["graph"]
    assert mixed.sum() <= -(-graph["leftover_rows"] // 16)
    assert graph["regions"] >= 4
    # the regions stage cut the cell graph; the region tasks dropped exactly the window entries
    # that the cut predicted (no region was chunked here: S exceeds every block)
    cut = work.meta("regions")
    assert cut["n_regions"] == graph["regions"]
    assert round(1 - cut["window_entries_between_blocks"] / (2000 * CONFIG.m), 4) == \
        graph["window_entries_in_region"]
    assert graph["window_entries_in_region"] > 0.9  # 40 topics of 50 rows: whole ones per region
    # negatives: every clustered row has k=3 candidates, none of them in its own cluster
    neg = plan.negatives_table()
    assert neg.num_rows == 2000
    cluster_of = dict(zip(rows.tolist(), clusters.column("cluster").to_pylist()))
    for row, negs in zip(neg.column("row").to_pylist()[:200],
                         neg.column("negative_rows").to_pylist()[:200]):
        assert len(negs) == 3 and all(cluster_of[n] != cluster_of[row] for n in negs)


def test_region_plan_is_deterministic(region_plan, corpus_path, tmp_path):
    # a fresh cluster of another shape (one worker, two threads) gives the same plan
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as other:
        again = run_job(corpus_path, CONFIG, tmp_path, client=other, report=False)
    again.plan.validate()
    same_files(region_plan.plan, again.plan)


def test_worker_killed_during_region_tasks(region_plan, corpus_path, tmp_path, monkeypatch):
    monkeypatch.setenv(DELAY_ENV, "0.5")  # each region task sleeps: time to kill a worker
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as c:
        victim = sorted(c.run(os.getpid).values())[0]
        killed: list[float] = []

        def kill_once(stage: str, fraction: float) -> None:
            if stage == "clusters" and not killed:
                os.kill(victim, signal.SIGKILL)
                killed.append(fraction)

        result = run_job(corpus_path, CONFIG, tmp_path, client=c, progress=kill_once,
                         report=False)
        assert killed and victim not in c.run(os.getpid).values()
    result.plan.validate()
    same_files(region_plan.plan, result.plan)


CLIENT_SCRIPT = """
import sys
from pipelines.engine import run_job
from tests.test_regions import CONFIG
run_job(sys.argv[1], CONFIG, sys.argv[2], scheduler=sys.argv[3], report=False)
"""


def test_client_killed_then_resumed(region_plan, corpus_path, tmp_path, client):
    """SIGKILL the process that drives the job once the graph stage is done; running the same
    job again skips the finished stages and gives the same plan."""
    env = {**os.environ, DELAY_ENV: "1.0"}  # region tasks take a second each
    proc = subprocess.Popen([sys.executable, "-c", CLIENT_SCRIPT, str(corpus_path),
                             str(tmp_path), client.scheduler.address], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    work = WorkDir(tmp_path / ".work" / job_id_for(corpus_path, CONFIG))
    deadline = time.monotonic() + 120
    while not work.is_done("graph") and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert work.is_done("graph"), "the client died or was too slow before the graph stage"
    proc.kill()
    proc.wait()
    assert not work.is_done("write")
    assert not any(p.name != ".work" for p in tmp_path.iterdir())  # no plan, not even partial
    result = run_job(corpus_path, CONFIG, tmp_path, client=client, report=False)
    for stage in ("load", "neighbours", "regions", "graph"):
        assert result.stages[stage] == "skipped"
    assert result.stages["write"] == "ran"
    result.plan.validate()
    same_files(region_plan.plan, result.plan)


def test_ivf_cells_are_the_rows_first_coarse_lists(corpus_path, tmp_path, client):
    """With an IVF index the cells are its coarse lists: every row's cell is the list it was
    added to, and the plan is valid with regions of at most S rows."""
    import faiss

    config = CONFIG.model_copy(update={"neighbours": NeighbourConfig(
        index="ivf", nlist=64, nprobe=8, block_size=250)})
    result = run_job(corpus_path, config, tmp_path, client=client, keep_work=True,
                     report=False)
    result.plan.validate()
    work = WorkDir(tmp_path / ".work" / result.job_id)
    assert work.meta("regions")["cells"] == 64
    index = faiss.read_index(str(work.path("index.faiss")))
    invlists = faiss.extract_index_ivf(index).invlists
    listed = np.empty(2000, np.int64)
    for lst in range(64):
        ids = faiss.rev_swig_ptr(invlists.get_ids(lst), invlists.list_size(lst))
        listed[np.asarray(ids)] = lst
    np.testing.assert_array_equal(np.load(work.path("regions/cell.npy")), listed)
    assert np.bincount(np.load(work.path("regions/region.npy"))).max() <= config.region_size


def test_cells_larger_than_s_are_chunked_by_the_tasks(corpus_path, tmp_path, client):
    """S below every cell's size: each block is cut into chunks in (cell, row) order by the
    label tasks (offsets streamed from the blocks' counts); regions hold at most S rows."""
    config = CONFIG.model_copy(update={"region_size": 32, "negatives": NegativesConfig()})
    result = run_job(corpus_path, config, tmp_path, client=client, keep_work=True,
                     report=False)
    result.plan.validate()
    work = WorkDir(tmp_path / ".work" / result.job_id)
    assert work.meta("regions")["chunked_blocks"] > 0
    region, cell = (np.load(work.path(f"regions/{n}.npy")) for n in ("region", "cell"))
    sizes = np.bincount(region)
    assert sizes.max() <= 32 and sizes.sum() == 2000
    # rows in (block, cell, row) order get non-decreasing regions: each block is cut in order
    with np.load(work.path("regions/layout.npz")) as layout:
        part = layout["part"]
    order = np.lexsort((np.arange(2000), cell, part[cell]))
    assert (np.diff(region[order]) >= 0).all()


def test_in_process_engine_refuses_regions(tmp_path, corpus_path):
    from b3mine.mining import mine

    with pytest.raises(ValueError, match="Dask engine"):
        mine(corpus_path, CONFIG, tmp_path)


# -- the core algorithms, without Dask ------------------------------------------------------

def test_region_layout_caps_and_orders_blocks_by_cell_then_row():
    rng = np.random.default_rng(0)
    n, n_cells, cap = 1000, 12, 150
    cells = rng.choice(n_cells, size=n, p=np.r_[0.4, np.full(n_cells - 1, 0.6 / (n_cells - 1))])
    part = np.array([0, 1, 1, 2, 2, 2, 0, 3, 3, 1, 2, 0])  # block 0 holds cell 0: > cap
    blocks = [(0, 300), (300, 650), (650, 1000)]
    counts = [np.bincount(cells[a:b], minlength=n_cells) for a, b in blocks]
    layout = core.RegionLayout.of(part, np.sum(counts, axis=0), cap)
    offsets = np.cumsum([np.zeros(n_cells, np.int64)] + counts[:-1], axis=0)
    labels = np.concatenate([layout.regions(cells[a:b], off)
                             for (a, b), off in zip(blocks, offsets)])
    got = np.bincount(labels, minlength=layout.n_regions)
    assert got.max() <= cap and got.sum() == n and (got > 0).all()
    # the same as one global sort by (block, cell, row), each block cut into equal chunks
    order = np.lexsort((np.arange(n), cells, part[cells]))
    expect, first = np.empty(n, np.int64), 0
    for blk in range(part.max() + 1):
        rows = order[part[cells[order]] == blk]
        chunks = -(-len(rows) // cap)
        expect[rows] = first + np.arange(len(rows)) // -(-len(rows) // chunks)
        first += chunks
    np.testing.assert_array_equal(labels, expect)


def planted_cells(groups: int, cells_per_group: int, rows_per_cell: int, m: int, seed: int):
    """Cells of rows in ``groups`` topics; every row's window points inside its topic."""
    rng = np.random.default_rng(seed)
    n_cells = groups * cells_per_group
    cell = rng.permutation(np.repeat(np.arange(n_cells), rows_per_cell))
    topic = cell % groups
    window = np.stack([rng.choice(np.flatnonzero(topic == t), size=m) for t in topic])
    return cell, topic, window


def test_partition_cells_keeps_topics_whole_under_the_cap():
    cell, topic, window = planted_cells(groups=6, cells_per_group=5, rows_per_cell=20, m=8,
                                        seed=1)
    n_cells = cell.max() + 1
    keys, counts = core.cell_pairs(cell, cell[window], n_cells)
    graph = core.cell_graph(keys, counts, n_cells)
    sizes = np.bincount(cell)
    part = core.partition_cells(graph, sizes, region_size=200, seed=3)  # 2 topics a region
    assert np.bincount(part, weights=sizes).max() <= 200
    # no window entry crosses a block: each topic's cells share one block
    assert all(len(np.unique(part[np.arange(n_cells) % 6 == t])) == 1 for t in range(6))
    np.testing.assert_array_equal(part, core.partition_cells(graph, sizes, 200, seed=3))


def test_cell_pairs_count_window_entries_between_cells():
    rng = np.random.default_rng(2)
    cells = rng.integers(0, 5, size=40)
    window_cells = np.where(rng.random((40, 6)) < 0.1, -1, rng.integers(0, 5, size=(40, 6)))
    keys, counts = core.cell_pairs(cells, window_cells, 5)
    expect = {}
    for i, row in enumerate(window_cells):
        for j in row:
            if j >= 0 and j != cells[i]:
                expect[cells[i] * 5 + j] = expect.get(cells[i] * 5 + j, 0) + 1
    assert dict(zip(keys.tolist(), counts.tolist())) == expect
    graph = core.cell_graph(keys, counts, 5).toarray()
    np.testing.assert_array_equal(graph, graph.T)
    assert graph.sum() == 2 * counts.sum() and np.diag(graph).sum() == 0


def test_a_cell_above_the_cap_is_chunked():
    sizes = np.array([700, 50, 50])
    graph = core.cell_graph(np.array([1, 5]), np.array([3, 3]), 3)
    part = core.partition_cells(graph, sizes, region_size=300, seed=0)
    layout = core.RegionLayout.of(part, sizes, 300)
    cells = np.repeat(np.arange(3), sizes)
    labels = layout.regions(cells, np.zeros(3, np.int64))
    assert np.bincount(labels).max() <= 300 and layout.n_regions >= 3


def test_region_graph_is_the_induced_mutual_window_graph():
    from b3mine.graph import window_graph

    rng = np.random.default_rng(1)
    window = rng.integers(-1, 60, size=(60, 8))
    full = window_graph(window, mutual=True)
    rows = np.sort(rng.choice(60, size=25, replace=False))
    graph, cross = core.region_graph(rows, window[rows], mutual=True)
    np.testing.assert_array_equal(graph.toarray(), full[rows][:, rows].toarray())
    w = window[rows]
    assert cross == int(((w >= 0) & ~np.isin(w, rows)).sum())


def test_epoch_keys_permute_and_differ_by_epoch():
    ids = np.arange(5000)
    a, b = core.epoch_keys(3, 0, ids), core.epoch_keys(3, 1, ids)
    assert np.unique(a).size == 5000
    assert not np.array_equal(np.argsort(a), np.argsort(b))
    np.testing.assert_array_equal(a, core.epoch_keys(3, 0, ids))
