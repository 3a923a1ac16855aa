"""Mixture plans: 3 datasets of different sizes -> single-dataset clusters and batches, the
configured proportions, the plan invariants, per-dataset windows, the CLI, Dask and a trainer."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from b3mine.config import MiningConfig
from b3mine.embeddings import Embeddings
from b3mine.errors import PlanError
from b3mine.mixture import (
    Mixture,
    MixtureDataset,
    counts_for_weights,
    mine_mixture,
    mine_part,
    part_config,
)
from b3mine.plan import BatchPlan

from tests.conftest import clustered_vectors, write_embeddings

SIZES = (480, 208, 960)
CONFIG = MiningConfig(batch_size=32, cluster_size=8, p=3, m=20, epochs=3, seed=5)


def datasets(weights=(1.0, 1.0, 2.0)) -> list[MixtureDataset]:
    return [MixtureDataset(name=f"d{i}", weight=w, p=1 if i == 1 else None, m=10 if i == 1
                           else None) for i, w in enumerate(weights)]


@pytest.fixture(scope="module")
def inputs() -> list[Embeddings]:
    out = []
    for i, n in enumerate(SIZES):
        q = clustered_vectors(n, 16, 12, seed=10 + i)
        t = clustered_vectors(n, 16, 12, seed=10 + i, noise=0.55)
        out.append(Embeddings.from_arrays(np.arange(n), q, t))
    return out


def batch_datasets(plan: BatchPlan, epoch: int) -> np.ndarray:
    """The dataset index of every position of every batch, (nb, B)."""
    mix = plan.manifest.mixture
    return mix.dataset_of_rows(plan.batch_rows(epoch).reshape(-1)).reshape(-1, plan.batch_size)


def check_single_dataset(plan: BatchPlan) -> list[np.ndarray]:
    plan.validate()
    counts = []
    for e in range(plan.epochs):
        which = batch_datasets(plan, e)
        assert (which == which[:, :1]).all()  # every batch from one dataset
        names = np.asarray(plan.epoch_table(e).column("dataset").to_numpy(zero_copy_only=False))
        assert (names.reshape(which.shape) == np.array(["d0", "d1", "d2"])[which]).all()
        counts.append(np.bincount(which[:, 0], minlength=3))
    clusters = plan.clusters_table()
    members = clusters.column("row").to_numpy().reshape(-1, plan.manifest.counts.cluster_size)
    which = plan.manifest.mixture.dataset_of_rows(members.reshape(-1)).reshape(members.shape)
    assert (which == which[:, :1]).all()  # clusters never cross datasets
    return counts


def test_size_rule_keeps_every_batch_and_the_datasets_own_mining(tmp_path, inputs) -> None:
    plan = mine_mixture(datasets(), CONFIG, tmp_path, inputs=inputs)
    counts = check_single_dataset(plan)
    # rule "size": each dataset contributes all of its batches, so shares follow sizes
    expected = [n // CONFIG.batch_size for n in SIZES]  # sizes are multiples of K: no remainder
    assert all(c.tolist() == expected for c in counts)
    assert [d.batches_per_epoch for d in plan.manifest.mixture.datasets] == expected
    # Each epoch interleaves the datasets afresh.
    assert not (batch_datasets(plan, 0)[:, 0] == batch_datasets(plan, 1)[:, 0]).all()
    # Dataset d1 was mined alone with its own window (p=1, m=10): same clusters, offset.
    parts = plan.manifest.mixture.datasets
    assert (parts[1].p, parts[1].m, parts[0].p, parts[0].m) == (1, 10, 3, 20)
    alone = mine_part(inputs[1], part_config(CONFIG, datasets()[1], 1))
    clusters = plan.clusters_table()
    in_d1 = np.asarray(clusters.column("dataset").to_numpy(zero_copy_only=False)) == "d1"
    rows = clusters.column("row").to_numpy()[in_d1].reshape(-1, CONFIG.cluster_size)
    rows = rows - parts[1].offset
    np.testing.assert_array_equal(rows, alone.clusters.members)
    assert clusters.column("id").to_pylist()[0].startswith("d0/")
    # The same inputs name the same plan.
    assert mine_mixture(datasets(), CONFIG, tmp_path, inputs=inputs).plan_id == plan.plan_id


def test_weights_rule_gives_the_configured_proportions(tmp_path, inputs) -> None:
    plan = mine_mixture(Mixture(datasets=datasets((1.0, 1.0, 2.0)), rule="weights"), CONFIG,
                        tmp_path, inputs=inputs)
    counts = check_single_dataset(plan)
    available = [n // CONFIG.batch_size for n in SIZES]  # 15, 6, 30
    assert counts_for_weights(available, [1, 1, 2]) == [6, 6, 12]
    assert all(c.tolist() == [6, 6, 12] for c in counts)
    # No row twice in an epoch, and the big datasets give a different subset each epoch.
    rows0, rows1 = plan.batch_rows(0), plan.batch_rows(1)
    assert len(np.unique(rows0)) == rows0.size
    assert set(rows0.reshape(-1).tolist()) != set(rows1.reshape(-1).tolist())
    # Weights that no integer split satisfies: remainders by largest fraction, capped.
    assert counts_for_weights([10, 10, 10], [1, 1, 1]) == [10, 10, 10]
    assert counts_for_weights([3, 100], [1, 1]) == [3, 3]
    assert counts_for_weights([7, 100, 100], [1, 2, 4]) == [7, 14, 28]


def test_a_batch_that_mixes_datasets_breaks_validation(tmp_path, inputs) -> None:
    import shutil

    import pyarrow as pa

    plan = mine_mixture(datasets(), MiningConfig(batch_size=32, cluster_size=8, p=3, m=20),
                        tmp_path / "plans", inputs=inputs, report=False)
    copy = tmp_path / "copy"
    shutil.copytree(plan.path, copy)
    table = pq.read_table(copy / "batches.parquet")
    rows = table.column("row").to_numpy().copy()
    which = plan.manifest.mixture.dataset_of_rows(rows)
    a, b = 0, int(np.flatnonzero(which != which[0])[0])  # swap a row with another dataset's
    rows[[a, b]] = rows[[b, a]]
    names = np.asarray(table.column("dataset").to_numpy(zero_copy_only=False)).copy()
    names[[a, b]] = names[[b, a]]
    table = table.set_column(table.column_names.index("row"), "row", pa.array(rows))
    table = table.set_column(table.column_names.index("dataset"), "dataset",
                             pa.array(names.tolist()))
    pq.write_table(table, copy / "batches.parquet", row_group_size=table.num_rows)
    with pytest.raises(PlanError, match="mixes datasets"):
        BatchPlan.open(copy).validate(check_hashes=False)


def test_mixture_file_on_the_command_line(tmp_path, inputs) -> None:
    from typer.testing import CliRunner

    from b3mine.cli import app

    data = tmp_path / "data"
    data.mkdir()
    lines = ['rule = "weights"']
    for i, emb in enumerate(inputs):
        write_embeddings(data / f"d{i}.parquet", emb.ids, emb.queries, emb.targets)
        lines += ["[[datasets]]", f'name = "d{i}"', f"weight = {[1, 1, 2][i]}",
                  f'embeddings = {{ path = "d{i}.parquet", target_column = "target" }}']
    (data / "mix.toml").write_text("\n".join(lines) + "\n")
    result = CliRunner().invoke(app, ["mine", "--mixture", str(data / "mix.toml"), "--out",
                                      str(tmp_path / "plans"), "--batch-size", "32",
                                      "--cluster-size", "8", "--p", "3", "--m", "20"])
    assert result.exit_code == 0, result.output
    assert "rule weights" in result.output
    (plan_dir,) = [p for p in (tmp_path / "plans").iterdir() if not p.name.startswith(".")]
    plan = BatchPlan.open(plan_dir)
    check_single_dataset(plan)
    assert [d.source for d in plan.manifest.mixture.datasets] == [
        str(data / f"d{i}.parquet") for i in range(3)]
    bad = CliRunner().invoke(app, ["mine", "--mixture", str(data / "mix.toml"), "--texts", "x"])
    assert bad.exit_code != 0 and "exactly one of" in bad.output


@pytest.mark.slow
def test_dask_mines_each_dataset_in_its_own_task_to_the_same_plan(tmp_path, inputs) -> None:
    pytest.importorskip("distributed")
    from distributed import Client, LocalCluster

    from pipelines.mixture import mine_mixture as dask_mine_mixture

    local = mine_mixture(datasets(), CONFIG, tmp_path / "local", inputs=inputs)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        remote = dask_mine_mixture(datasets(), CONFIG, tmp_path / "dask", inputs=inputs,
                                   client=client)
        # `--engine dask` reaches the same function through the engine's entry point
        from pipelines.engine import mine as engine_mine

        via_engine = engine_mine(Mixture(datasets=datasets()), CONFIG, tmp_path / "engine",
                                 inputs=inputs, client=client)
    assert remote.plan_id == local.plan_id == via_engine.plan_id
    for e in range(CONFIG.epochs):
        np.testing.assert_array_equal(remote.batch_rows(e), local.batch_rows(e))
    assert remote.manifest.files["clusters.parquet"] == local.manifest.files["clusters.parquet"]


TOPICS = ["cats", "rivers", "guitars", "volcanoes", "bread", "satellites", "chess", "tulips"]


def text_rows(name: str, n: int) -> list[dict]:
    return [{"query": f"{name} question {i} about {TOPICS[i % 8]}?",
             "target": f"{name} answer {i}: a fact about {TOPICS[i % 8]}."} for i in range(n)]


@pytest.mark.slow
def test_sentence_transformers_trains_on_a_mixture_plan(tmp_path) -> None:
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("accelerate")
    datasets_lib = pytest.importorskip("datasets")
    import torch
    from sentence_transformers import (SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments)
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from b3mine.teacher import load_teacher
    from b3mine.texts import TextSource
    from tests.test_embed import write_jsonl
    from trainers.sentence_transformers import PlanSTBatchSampler

    sizes = {"faq": 16, "wiki": 32, "news": 48}
    parts, train_rows = [], []
    for name, n in sizes.items():
        rows = text_rows(name, n)
        path = write_jsonl(tmp_path / f"{name}.jsonl", rows)
        # texts: embedded by the mixture itself with the packaged teacher
        parts.append(MixtureDataset(name=name, texts=TextSource(path=str(path))))
        train_rows += rows  # the training set: the datasets concatenated in mixture order
    plan = mine_mixture(parts, MiningConfig(batch_size=16, cluster_size=8, p=1, m=8),
                        tmp_path / "plans")
    assert all(Path(d.source).parent == tmp_path / "plans" / ".embeddings"
               for d in plan.manifest.mixture.datasets)
    model = load_teacher(None, device="cpu")
    check = plan.manifest.mixture
    assert [d.batches_per_epoch for d in check.datasets] == [1, 2, 3]
    train = datasets_lib.Dataset.from_list(train_rows).rename_columns(
        {"query": "anchor", "target": "positive"})
    seen: list[list[int]] = []

    class Recording(PlanSTBatchSampler):
        def __iter__(self):
            for batch in super().__iter__():
                seen.append(batch)
                yield batch

    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
        learning_rate=1e-5, batch_sampler=Recording.configure(plan), report_to=[], save_strategy="no",
        use_cpu=True, dataloader_num_workers=0, seed=0)
    torch.manual_seed(0)
    result = SentenceTransformerTrainer(model=model, args=args, train_dataset=train,
                                        loss=MultipleNegativesRankingLoss(model)).train()
    assert result.global_step == 2 and np.isfinite(result.training_loss)
    for k, batch in enumerate(seen[:2]):
        assert batch == plan.batch_rows(0)[k].tolist()
        prefixes = {train_rows[i]["query"].split()[0] for i in batch}
        assert len(prefixes) == 1  # one dataset per batch, as trained on
