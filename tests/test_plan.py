"""Mining end to end: plan invariants (property-based), atomic writes, negatives, report."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from b3mine import BatchPlan, MiningConfig, PlanError, list_plans
from b3mine.batches import assemble_batches
from b3mine.config import NegativesConfig
from b3mine.embeddings import Embeddings
from b3mine.mining import mine
from tests.conftest import clustered_vectors


def rows_per_epoch(plan: BatchPlan, e: int) -> np.ndarray:
    t = plan.epoch_table(e)
    return t.column("row").to_numpy()[~t.column("padded").to_numpy(zero_copy_only=False)]


def test_small_plan_is_valid_and_complete(small_plan, small_config):
    small_plan.validate()
    c = small_plan.manifest.counts
    assert c.batch_size == 128 and c.cluster_size == 16 and c.epochs == 2
    clustered = np.sort(small_plan.clusters_table().column("row").to_numpy())
    for e in range(2):
        rows = small_plan.batch_rows(e)
        assert rows.shape == (c.batches_per_epoch, 128)
        real = rows_per_epoch(small_plan, e)
        assert len(np.unique(real)) == len(real)  # every example at most once per epoch
        # with drop policies an epoch leaves out at most one batch's worth of clusters
        assert len(real) > len(clustered) - 128
    # batches are re-drawn per epoch, clusters stay whole
    assert not np.array_equal(small_plan.batch_rows(0), small_plan.batch_rows(1))
    t = small_plan.epoch_table(0)
    cl = t.column("cluster").to_numpy().reshape(-1, 16)
    assert (cl == cl[:, :1]).all()


def test_same_inputs_same_plan_id_and_no_recompute(tmp_path, corpus_path, small_config, small_plan):
    again = mine(corpus_path, small_config, small_plan.path.parent)
    assert again.plan_id == small_plan.plan_id
    other = mine(corpus_path, small_config.model_copy(update={"seed": 8}), tmp_path)
    assert other.plan_id != small_plan.plan_id


def test_plan_is_harder_than_random(small_plan):
    q = small_plan.report()
    # a batch holds 8 clusters of 16: most in-batch pairs still cross clusters
    assert q["plan"]["mean"] > q["random"]["mean"] + 0.05
    assert q["mean_similarity_ratio"] > 4
    assert q["plan"]["p90"] > q["random"]["p90"]
    assert (small_plan.path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_hnps_negatives_are_hard_and_not_in_cluster(small_plan, corpus_path):
    from b3mine.embeddings import load_embeddings

    emb = load_embeddings(corpus_path, normalize=True)
    neg = small_plan.negatives_table()
    clusters = small_plan.clusters_table()
    cluster_of = dict(zip(clusters.column("row").to_pylist(), clusters.column("cluster").to_pylist()))
    lists = neg.column("negative_rows").to_pylist()
    rows = neg.column("row").to_numpy()
    assert all(len(x) == 3 for x in lists)
    sims, rand = [], []
    rng = np.random.default_rng(0)
    for r, negs in zip(rows, lists):
        assert r not in negs
        assert all(cluster_of.get(n) != cluster_of[r] for n in negs)  # members are zeroed
        assert len(set(negs)) == len(negs)
        sims += [float(emb.queries[r] @ emb.queries[n]) for n in negs]
        rand += [float(emb.queries[r] @ emb.queries[rng.integers(len(emb.queries))])]
    assert np.mean(sims) > np.mean(rand) + 0.2
    # positive-aware filter: nothing above 95% of the positive (self) score
    assert max(sims) <= 0.95 + 1e-6


def test_hnips_and_paired_data(tmp_path):
    x = clustered_vectors(600, 16, 12, seed=5)
    t = clustered_vectors(600, 16, 12, seed=5, noise=0.6)  # targets: noisy views of the queries
    emb = Embeddings.from_arrays([f"r{i}" for i in range(600)], x, t)
    cfg = MiningConfig(batch_size=64, cluster_size=8, p=2, m=15, algorithm="igraph-louvain",
                       negatives=NegativesConfig(mode="hnips", k=4, depth=20))
    plan = mine(emb, cfg, tmp_path)
    plan.validate()
    assert plan.manifest.dataset.paired and plan.manifest.dataset.id_type == "string"
    rows = plan.batch_rows(0)[0]
    neg = plan.negatives_for(rows)
    assert isinstance(neg, np.ndarray) and neg.shape == (64, 4) and neg.dtype == np.int64
    lists = plan.negatives_take(rows)["negative_rows"].to_pylist()
    assert [[n for n in r if n >= 0] for r in neg.tolist()] == lists  # -1 only pads
    assert plan.negatives_for(rows[:0]).shape == (0, 4)
    assert plan.epoch_table(0).column("id")[0].as_py().startswith("r")


def test_fill_policies_flag_padding(tmp_path):
    x = clustered_vectors(203, 8, 6, seed=2)  # 203 = 6*32 + 11: a remainder and a short batch
    emb = Embeddings.from_arrays(np.arange(203), x)
    cfg = MiningConfig(batch_size=64, cluster_size=8, p=1, m=10, remainder="fill",
                       last_batch="fill", epochs=3)
    plan = mine(emb, cfg, tmp_path)
    plan.validate()
    c = plan.manifest.counts
    assert c.remainder_dropped == 0 and c.remainder_padded == 5  # 203 -> 26 clusters of 8
    assert c.batches_per_epoch == 4 and c.last_batch_padded == 6 * 8
    for e in range(3):
        real = rows_per_epoch(plan, e)
        assert sorted(real) == list(range(203))  # every example exactly once per epoch
        padded = plan.epoch_table(e).column("padded").to_numpy(zero_copy_only=False)
        assert padded.sum() == 4 * 64 - 203


def test_batches_deterministic_per_seed_and_epoch_independent():
    members = np.arange(80).reshape(20, 4)
    pad = np.zeros_like(members, bool)
    a = assemble_batches(members, pad, batch_size=16, epochs=3, seed=1, last_batch="drop")
    b = assemble_batches(members, pad, batch_size=16, epochs=2, seed=1, last_batch="drop")
    np.testing.assert_array_equal(a.rows[:2], b.rows)  # epoch e doesn't depend on epoch count
    c = assemble_batches(members, pad, batch_size=16, epochs=1, seed=2, last_batch="drop")
    assert not np.array_equal(a.rows[0], c.rows[0])


def test_affinity_grouping_puts_linked_clusters_together(tmp_path):
    from b3mine.batches import affinity_permutation, cluster_affinity
    from b3mine.mining import build_graph, compute_neighbours, make_clusters, prepare

    x = clustered_vectors(1600, 16, 10, seed=4, noise=0.7)
    emb = Embeddings.from_arrays(np.arange(1600), x)
    cfg = MiningConfig(batch_size=64, cluster_size=8, p=2, m=20)
    graph = build_graph(compute_neighbours(prepare(emb, cfg), cfg), cfg)
    members = make_clusters(graph, cfg).members
    aff = cluster_affinity(graph, members)
    assert (aff != aff.T).nnz == 0 and aff.diagonal().sum() == 0
    rng = np.random.default_rng(0)
    order = affinity_permutation(aff, 8, rng)
    assert sorted(order.tolist()) == list(range(len(members)))  # a permutation

    def linked(order: np.ndarray) -> float:
        groups = order[: len(order) // 8 * 8].reshape(-1, 8)
        return float(np.mean([aff[g][:, g].sum() for g in groups]))

    assert linked(order) > 3 * linked(rng.permutation(len(members)))
    a = affinity_permutation(aff, 8, np.random.default_rng(1))
    assert not np.array_equal(a, order)  # re-drawn with the epoch's seed


def test_failed_write_leaves_no_plan(tmp_path, corpus_path, small_config, monkeypatch):
    import b3mine.plan as plan_mod

    real = plan_mod._write_tables

    def crash(tmp, tables):
        real(tmp, tables)
        raise OSError("disk full (injected)")

    monkeypatch.setattr(plan_mod, "_write_tables", crash)
    with pytest.raises(OSError, match="injected"):
        mine(corpus_path, small_config, tmp_path)
    assert list_plans(tmp_path) == []
    assert list(tmp_path.iterdir()) == []  # temp dir cleaned up too


def test_reader_rejects_tampered_plans(tmp_path, small_plan):
    import shutil

    copy = Path(shutil.copytree(small_plan.path, tmp_path / small_plan.plan_id))
    t = pq.read_table(copy / "batches.parquet")
    rows = t.column("row").to_numpy().copy()
    rows[1] = rows[0]  # a duplicate, unflagged
    import pyarrow as pa

    t = t.set_column(t.column_names.index("row"), "row", pa.array(rows))
    pq.write_table(t, copy / "batches.parquet", row_group_size=len(rows) // 2)
    with pytest.raises(PlanError, match="does not match the manifest hash"):
        BatchPlan.open(copy).validate()
    with pytest.raises(PlanError, match="appears twice without being marked padded"):
        BatchPlan.open(copy).validate(check_hashes=False)
    (copy / "clusters.parquet").unlink()
    with pytest.raises(PlanError, match="clusters.parquet listed in the manifest is missing"):
        BatchPlan.open(copy)
    with pytest.raises(PlanError, match="not a plan directory"):
        BatchPlan.open(tmp_path)


@pytest.mark.parametrize("column,change,message", [
    ("id", lambda v: v + 10**9, "row .* has a wrong id or cluster"),
    ("cluster", lambda v: v + 1, "row .* has a wrong id or cluster"),
    ("row", lambda v: v + 10**9, "row 1000.* is in no cluster"),
])
def test_validate_checks_each_batch_row_against_its_cluster(tmp_path, small_plan, column,
                                                            change, message):
    import shutil

    import pyarrow as pa

    copy = Path(shutil.copytree(small_plan.path, tmp_path / small_plan.plan_id))
    t = pq.read_table(copy / "batches.parquet")
    values = t.column(column).to_numpy().copy()
    real = np.flatnonzero(~t.column("padded").to_numpy(zero_copy_only=False))
    values[real[7]] = change(values[real[7]])
    t = t.set_column(t.column_names.index(column), column, pa.array(values))
    pq.write_table(t, copy / "batches.parquet", row_group_size=len(values) // 2)
    with pytest.raises(PlanError, match=message):
        BatchPlan.open(copy).validate(check_hashes=False)


def test_epoch_and_batch_bounds(small_plan):
    with pytest.raises(PlanError, match=r"epoch 2 out of range \[0, 2\)"):
        small_plan.epoch_table(2)
    with pytest.raises(PlanError, match="batch -1 out of range"):
        small_plan.batch_table(0, -1)
    assert small_plan.batch_table(1, 3).num_rows == 128


def test_manifest_is_self_describing(small_plan, small_config):
    m = json.loads((small_plan.path / "manifest.json").read_text())
    assert m["config"] == small_config.model_dump(mode="json")
    assert m["dataset"]["n_rows"] == 2000 and m["dataset"]["dim"] == 32
    assert {"b3mine", "numpy", "faiss-cpu", "pyarrow"} <= set(m["versions"])
    assert set(m["files"]) >= {"clusters.parquet", "batches.parquet", "negatives.parquet"}
    assert {"neighbours", "graph", "clusters", "batches"} <= set(m["stats"]["timings"])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(40, 260),
    k=st.sampled_from([2, 4, 8]),
    cpb=st.sampled_from([1, 2, 3]),
    epochs=st.integers(1, 3),
    remainder=st.sampled_from(["drop", "fill"]),
    last_batch=st.sampled_from(["drop", "fill"]),
    algorithm=st.sampled_from(["metis", "igraph-louvain", "leiden"]),
    graph=st.sampled_from(["mutual", "symmetric"]),
    grouping=st.sampled_from(["random", "affinity"]),
    seed=st.integers(0, 2**16),
)
def test_plan_invariants_property(n, k, cpb, epochs, remainder, last_batch, algorithm, graph,
                                  grouping, seed):
    batch = k * cpb
    if n < batch:
        return
    x = clustered_vectors(n, 6, 5, seed=seed)
    cfg = MiningConfig(batch_size=batch, cluster_size=k, p=1, m=8, epochs=epochs,
                       remainder=remainder, last_batch=last_batch, algorithm=algorithm,
                       graph=graph, batch_grouping=grouping, seed=seed)
    with tempfile.TemporaryDirectory() as out:
        plan = mine(Embeddings.from_arrays(np.arange(n) * 3, x), cfg, out, report=False)
        plan.validate()
        c = plan.manifest.counts
        clustered = plan.clusters_table()
        crow = clustered.column("row").to_numpy()
        cpad = clustered.column("padded").to_numpy(zero_copy_only=False)
        real_members = set(crow[~cpad].tolist())
        # clusters: exactly K each, a partition of the rows less the dropped remainder
        assert len(crow) == c.n_clusters * k
        assert len(real_members) + c.remainder_dropped == n
        assert c.remainder_dropped < k
        if remainder == "fill":
            assert c.remainder_dropped == 0
        for e in range(epochs):
            t = plan.epoch_table(e)
            rows = t.column("row").to_numpy()
            padded = t.column("padded").to_numpy(zero_copy_only=False)
            assert len(rows) == c.batches_per_epoch * batch
            real = rows[~padded]
            assert len(set(real.tolist())) == len(real)
            assert set(real.tolist()) <= real_members
            if last_batch == "fill":
                assert set(real.tolist()) == real_members  # every example once per epoch
            else:
                assert len(real_members) - len(real) < batch
            ids = t.column("id").to_numpy()
            np.testing.assert_array_equal(ids, rows * 3)


def test_repr_is_one_short_line(small_plan):
    text = repr(small_plan)
    assert text == (f"BatchPlan({str(small_plan.path)!r}, rows=2000, epochs=2, "
                    f"batches_per_epoch={small_plan.batches_per_epoch}, batch_size=128)")
    assert len(text) < 200 + len(str(small_plan.path))


@pytest.fixture()
def grouped_plan(tmp_path, corpus_path, small_config, monkeypatch):
    """``small_plan``'s content written with row groups of 3 batches (and of 24 clusters), so
    epochs and the cluster table span several groups, the last one short."""
    import b3mine.plan as plan_mod

    monkeypatch.setattr(plan_mod, "ROW_GROUP_ROWS", 3 * small_config.batch_size)
    return mine(corpus_path, small_config, tmp_path / "grouped")


def test_groups_of_whole_batches_read_as_one_epoch(grouped_plan, small_plan):
    c = grouped_plan.manifest.counts
    assert c.batches_per_row_group == 3
    # the default, 65,536 rows: one group per epoch at this size
    assert small_plan.manifest.counts.batches_per_row_group == 512 >= c.batches_per_epoch
    per_epoch = -(-c.batches_per_epoch // 3)
    meta = pq.ParquetFile(grouped_plan.path / "batches.parquet").metadata
    assert per_epoch >= 2 and meta.num_row_groups == c.epochs * per_epoch
    assert {meta.row_group(g).num_rows for g in range(per_epoch - 1)} == {3 * 128}
    assert pq.ParquetFile(grouped_plan.path / "clusters.parquet").metadata.num_row_groups > 1
    grouped_plan.validate()
    assert grouped_plan.plan_id == small_plan.plan_id  # the layout is not the content
    for e in range(c.epochs):
        assert grouped_plan.epoch_table(e).equals(small_plan.epoch_table(e))
        assert np.array_equal(grouped_plan.batch_rows(e), small_plan.batch_rows(e))
        for b in (0, 2, 3, c.batches_per_epoch - 1):  # group edges and the short last group
            assert grouped_plan.batch_table(e, b).equals(small_plan.batch_table(e, b))
    assert grouped_plan.clusters_table().equals(small_plan.clusters_table())
    assert grouped_plan.negatives_table().equals(small_plan.negatives_table())


def test_plans_with_one_group_per_epoch_still_read(tmp_path, grouped_plan):
    """Plans written before row groups of batches (no ``batches_per_row_group``)."""
    import shutil

    copy = Path(shutil.copytree(grouped_plan.path, tmp_path / grouped_plan.plan_id))
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["counts"]["batches_per_row_group"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    t = pq.read_table(copy / "batches.parquet")
    pq.write_table(t, copy / "batches.parquet", row_group_size=t.num_rows // 2)
    old = BatchPlan.open(copy)
    old.validate(check_hashes=False)
    assert old.batch_table(1, 4).equals(grouped_plan.batch_table(1, 4))
    pq.write_table(t, copy / "batches.parquet", row_group_size=3 * 128)  # groups, no field
    with pytest.raises(PlanError, match=r"row groups, expected 2 \(1 per epoch\)"):
        BatchPlan.open(copy).validate(check_hashes=False)


@pytest.mark.parametrize("table,message", [
    ("batches.parquet", "row .* appears twice without being marked padded"),
    ("clusters.parquet", "a non-padded row appears in two clusters"),
])
def test_validate_finds_repeats_across_row_groups(tmp_path, grouped_plan, table, message):
    """A row repeated in two different row groups: only a check over the whole table (the
    bit set, not a per-group check) sees it."""
    import shutil

    import pyarrow as pa

    copy = Path(shutil.copytree(grouped_plan.path, tmp_path / grouped_plan.plan_id))
    file = pq.ParquetFile(copy / table)
    t = file.read()
    rows = t.column("row").to_numpy().copy()
    padded = t.column("padded").to_numpy(zero_copy_only=False)
    first = file.metadata.row_group(0).num_rows
    a = int(np.flatnonzero(~padded[:first])[0])
    b = first + int(np.flatnonzero(~padded[first:])[0])  # in the second group
    rows[b] = rows[a]
    t = t.set_column(t.column_names.index("row"), "row", pa.array(rows))
    pq.write_table(t, copy / table, row_group_size=first)
    with pytest.raises(PlanError, match=message):
        BatchPlan.open(copy).validate(check_hashes=False)
