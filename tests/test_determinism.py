"""One plan id, one plan: byte-identical plans on tie-heavy data whatever the engine, block size,
corpus sharding or input sharding (ALGORITHMS.md §9). The corpus is full of exact duplicates,
distinct rows with exactly equal scores (vectors on a coarse grid) and 1-ulp near-ties - the
cases Gaussian test data never produces."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from b3mine.config import MiningConfig, NegativesConfig, NeighbourConfig
from b3mine.mining import mine
from b3mine.neighbours import (
    Neighbours,
    canonical_order,
    merge_ranked,
    pair_scores,
    score_error,
    search,
)

from tests.conftest import write_embeddings

DATA_FILES = ("clusters.parquet", "batches.parquet", "negatives.parquet", "report.json")


def tie_heavy(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Clustered vectors where a third of the rows tie with another row."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(2, n // 60), d))
    x = centres[rng.integers(0, len(centres), n)] + 0.6 * rng.normal(size=(n, d))
    x[::7] = np.round(x[::7] * 2) / 2  # a coarse grid: distinct rows with equal scores
    x[rng.integers(0, n, n // 5)] = x[rng.integers(0, n, n // 5)]  # exact duplicates
    near = rng.integers(0, n, n // 15)
    x[near] = x[rng.integers(0, n, n // 15)]
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    x[near, 0] = np.nextafter(x[near, 0], np.float32(2))  # 1-ulp near-ties of a duplicate
    return x


def canonical_truth(x: np.ndarray, k: int) -> np.ndarray:
    """Brute force: every pair scored in float64, sorted by (-score, row)."""
    n = len(x)
    s = pair_scores(x, x, np.repeat(np.arange(n), n), np.tile(np.arange(n), n)).reshape(n, n)
    return np.lexsort((np.broadcast_to(np.arange(n), (n, n)), -s), axis=1)[:, :k]


@pytest.fixture(scope="module")
def ties() -> np.ndarray:
    return tie_heavy(900, 24, seed=3)


@pytest.mark.parametrize("cfg", [
    NeighbourConfig(index="flat", device="cpu"),
    NeighbourConfig(index="flat", device="cpu", block_size=37),
    NeighbourConfig(index="flat", device="cpu", block_size=1),
    NeighbourConfig(index="torch", device="cpu", block_size=101),
], ids=["flat", "flat-block37", "flat-block1", "torch-cpu"])
def test_exact_search_is_the_canonical_order(ties, cfg):
    if cfg.index == "torch":
        pytest.importorskip("torch")
    truth = canonical_truth(ties, 40)
    found = search(ties, ties, 40, cfg)
    np.testing.assert_array_equal(found.rows, truth)
    assert (np.diff(found.scores, axis=1) <= 0).all()


def test_sharded_merge_is_the_canonical_order(ties):
    cfg = NeighbourConfig(index="flat", device="cpu", block_size=50)
    parts = []
    for a, b in ((0, 130), (130, 131), (131, 600), (600, 900)):
        found = search(ties, ties[a:b], 40, cfg)
        parts.append(Neighbours(rows=np.where(found.rows >= 0, found.rows + a, -1),
                                scores=found.scores))
    merged = merge_ranked(ties, ties, np.arange(len(ties)), parts, 40, 1.0)
    np.testing.assert_array_equal(merged.rows, canonical_truth(ties, 40))


@pytest.mark.parametrize("shuffle", [False, True], ids=["by-score", "any-order"])
def test_canonical_order_of_candidate_lists(ties, shuffle):
    """Candidates in searcher order (descending float32 scores) or shuffled, with missing
    entries (-1): both give the brute-force order (the sorted fast path is not a shortcut)."""
    n, k, width = len(ties), 40, 60
    truth = canonical_truth(ties, width)
    rng = np.random.default_rng(5)
    rows = truth.copy()
    rows[rng.random(n) < 0.2, width - 5:] = -1  # short lists: fewer candidates than width
    scores = np.where(rows >= 0, (ties[np.arange(n)[:, None]] * ties[np.maximum(rows, 0)]
                                  ).sum(-1, dtype=np.float32), -np.inf).astype(np.float32)
    if shuffle:
        order = np.argsort(rng.random(rows.shape), axis=1)
        rows, scores = np.take_along_axis(rows, order, 1), np.take_along_axis(scores, order, 1)
    else:
        order = np.argsort(-scores, axis=1, kind="stable")  # float32 order, ties unresolved
        rows, scores = np.take_along_axis(rows, order, 1), np.take_along_axis(scores, order, 1)
    got, got_scores, _ = canonical_order(ties, ties, np.arange(n), rows, scores,
                                         score_error(ties, 1.0), k)
    np.testing.assert_array_equal(got, truth[:, :k])
    assert (np.diff(got_scores, axis=1) <= 0).all()


@pytest.mark.parametrize("index", ["ivf", "hnsw"])
def test_approximate_order_does_not_depend_on_block_size(ties, index):
    a = search(ties, ties, 40, NeighbourConfig(index=index, nprobe=3))
    b = search(ties, ties, 40, NeighbourConfig(index=index, nprobe=3, block_size=29))
    np.testing.assert_array_equal(a.rows, b.rows)
    np.testing.assert_array_equal(a.scores, b.scores)


# -- whole plans ----------------------------------------------------------------------------

N_ROWS, DIM = 2400, 32
CONFIG = MiningConfig(batch_size=128, cluster_size=16, p=2, m=12, epochs=2, seed=1,
                      negatives=NegativesConfig(mode="hnps", k=3, depth=20))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The tie-heavy corpus as one Parquet file and as three shards with odd row groups."""
    root = tmp_path_factory.mktemp("ties")
    x = tie_heavy(N_ROWS, DIM, seed=11)
    ids = np.arange(N_ROWS) * 3 + 7
    single = write_embeddings(root / "corpus.parquet", ids, x)
    shards = root / "shards"
    shards.mkdir()
    table = pq.read_table(single)
    for i, (a, b) in enumerate(((0, 701), (701, 1500), (1500, N_ROWS))):
        pq.write_table(table.slice(a, b - a), shards / f"part-{i}.parquet", row_group_size=173)
    return single, shards


def plan_files(plan) -> dict[str, str | None]:
    return {name: plan.manifest.files.get(name) for name in DATA_FILES}


def with_block(config: MiningConfig, block: int) -> MiningConfig:
    return config.model_copy(update={"neighbours": NeighbourConfig(block_size=block)})


@pytest.mark.slow
def test_byte_identical_plans_across_engines_shards_and_blocks(corpus, tmp_path):
    pytest.importorskip("distributed")
    from distributed import Client, LocalCluster

    from pipelines.engine import run_job

    single, shards = corpus
    reference = mine(single, CONFIG, tmp_path / "a")
    runs = {
        "in-process, block 97": mine(single, with_block(CONFIG, 97), tmp_path / "b"),
        "in-process, sharded input": mine(shards, CONFIG, tmp_path / "c"),
    }
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                           dashboard_address=":0")
    try:
        with Client(cluster) as client:
            runs["dask"] = run_job(single, CONFIG, tmp_path / "d", client=client,
                                   shard_rows=500).plan
            runs["dask, sharded input, 3 corpus shards, block 300"] = run_job(
                shards, with_block(CONFIG, 300), tmp_path / "e", client=client,
                target_shards=3).plan
    finally:
        cluster.close()
    want = plan_files(reference)
    assert want["negatives.parquet"] is not None
    for name, plan in runs.items():
        got = plan_files(plan)
        assert got == want, name
        assert plan.plan_id == reference.plan_id, name  # the block size is not in the id


def test_hnips_filter_is_decided_exactly(corpus, tmp_path):
    """HNIPS compares searched scores with the positive's: same negatives at any block size."""
    single, _ = corpus
    config = CONFIG.model_copy(update={"negatives": NegativesConfig(mode="hnips", k=3, depth=20,
                                                                      positive_filter=0.999)})
    a = mine(single, config, tmp_path / "a", report=False)
    b = mine(single, with_block(config, 61), tmp_path / "b", report=False)
    assert a.manifest.files["negatives.parquet"] == b.manifest.files["negatives.parquet"]
    assert a.manifest.files["clusters.parquet"] == b.manifest.files["clusters.parquet"]


def test_plan_id_covers_result_versions(monkeypatch):
    from b3mine import plan as plan_module

    before = plan_module.plan_id_for("f" * 32, CONFIG)
    monkeypatch.setattr(plan_module, "RESULT_VERSION", plan_module.RESULT_VERSION + 1)
    assert plan_module.plan_id_for("f" * 32, CONFIG) != before
    monkeypatch.undo()
    real = plan_module.result_versions(CONFIG)
    library = plan_module.RESULT_LIBRARIES[CONFIG.algorithm][0]
    assert library in real and "numpy" in real
    monkeypatch.setattr(plan_module, "result_versions", lambda c: {**real, library: "0.0"})
    assert plan_module.plan_id_for("f" * 32, CONFIG) != before



def test_regions_version_changes_region_plan_ids_only(monkeypatch):
    from b3mine import plan as plan_module

    regions = CONFIG.model_copy(update={"region_size": 500, "algorithm": "metis"})
    assert "kaminpar" in plan_module.result_versions(regions)  # it cuts the regions
    before = {c.region_size: plan_module.plan_id_for("f" * 32, c) for c in (CONFIG, regions)}
    monkeypatch.setattr(plan_module, "REGIONS_VERSION", plan_module.REGIONS_VERSION + 1)
    assert plan_module.plan_id_for("f" * 32, CONFIG) == before[None]
    assert plan_module.plan_id_for("f" * 32, regions) != before[500]
