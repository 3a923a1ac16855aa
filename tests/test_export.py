"""Exports: the plan's rows, in plan order, as a sentence-transformers dataset that a real
SentenceTransformerTrainer trains on, and as FlagEmbedding JSONL."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from b3mine.config import MiningConfig, NegativesConfig
from b3mine.errors import InputError
from b3mine.export import export_plan
from b3mine.mining import mine

from tests.test_embed import pair_rows, write_jsonl

datasets = pytest.importorskip("datasets")

CONFIG = MiningConfig(batch_size=16, cluster_size=8, p=1, m=8, epochs=2, seed=3,
                      negatives=NegativesConfig(mode="hnps", k=2, depth=16))


def fake_embeddings(path: Path, rows: list[dict], keep_texts: bool = True, seed: int = 0,
                    prefix: str = "") -> Path:
    """An embeddings file in b3mine embed's layout, with random vectors (no model needed)."""
    import pyarrow.parquet as pq

    from b3mine.teacher import embedding_table
    from tests.conftest import clustered_vectors

    n = len(rows)
    vec = np.stack([clustered_vectors(n, 16, 4, seed=seed), clustered_vectors(n, 16, 4, seed=seed)])
    table = embedding_table(np.array([f"{prefix}{i}" for i in range(n)]), vec,
                            [r["query"] for r in rows] if keep_texts else None,
                            [r["target"] for r in rows] if keep_texts else None)
    pq.write_table(table, path)
    return path


@pytest.fixture(scope="module")
def text_plan(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    rows = pair_rows(64)
    emb = fake_embeddings(tmp / "emb.parquet", rows)
    from b3mine.teacher import embedding_source

    return mine(embedding_source(emb, True), CONFIG, tmp / "plans", report=False), rows


def sequential_batches(dataset, batch_size, drop_last, **_):
    """The mined batches of an export: consecutive blocks of the plan's batch size, unshuffled."""
    from torch.utils.data import BatchSampler, SequentialSampler

    return BatchSampler(SequentialSampler(dataset), batch_size, drop_last=False)


def test_st_export_is_plan_ordered_and_complete(tmp_path, text_plan) -> None:
    plan, rows = text_plan
    out = export_plan(plan, tmp_path / "st")
    ds = datasets.load_from_disk(str(out))
    assert ds.column_names == ["anchor", "positive", "negative_1", "negative_2"]
    plan_rows = np.concatenate([plan.batch_rows(e).reshape(-1) for e in range(plan.epochs)])
    assert len(ds) == len(plan_rows) == plan.epochs * plan.batches_per_epoch * 16
    assert ds["anchor"] == [rows[r]["query"] for r in plan_rows]
    assert ds["positive"] == [rows[r]["target"] for r in plan_rows]
    negs = plan.negatives_for(plan_rows)
    for i, r in enumerate(plan_rows[:64]):
        first = [rows[j]["target"] for j in negs[i]][:2]
        assert [ds[i]["negative_1"], ds[i]["negative_2"]][: len(first)] == first
        assert rows[r]["target"] not in (ds[i]["negative_1"], ds[i]["negative_2"])
    info = json.loads((out / "b3mine_export.json").read_text())
    assert (info["batch_size"], info["epochs"], info["plan_id"]) == (16, [0, 1], plan.plan_id)
    # One epoch, more negatives than the plan has: completed from the batch, never the positive.
    one = datasets.load_from_disk(str(export_plan(plan, tmp_path / "e1", epochs=[1],
                                                  negatives=4)))
    assert len(one) == plan.batches_per_epoch * 16 and "negative_4" in one.column_names
    batch1 = [rows[r]["target"] for r in plan.batch_rows(1)[0]]
    assert one[0]["negative_4"] in batch1 and one[0]["negative_4"] != one[0]["positive"]


def test_jsonl_export_is_flagembedding_layout(tmp_path, text_plan) -> None:
    plan, rows = text_plan
    out = export_plan(plan, tmp_path / "train.jsonl", format="jsonl", epochs=[0])
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == plan.batches_per_epoch * 16
    first = plan.batch_rows(0)[0][0]
    assert lines[0]["query"] == rows[first]["query"] and lines[0]["pos"] == [rows[first]["target"]]
    assert all(set(x) == {"query", "pos", "neg"} and len(x["neg"]) == 2 for x in lines)


def test_texts_come_from_a_flag_when_the_embeddings_hold_none(tmp_path) -> None:
    from b3mine.teacher import embedding_source

    rows = pair_rows(32)
    emb = fake_embeddings(tmp_path / "bare.parquet", rows, keep_texts=False)
    bare = MiningConfig(batch_size=16, cluster_size=8, p=1, m=8,
                        negatives=NegativesConfig(mode="none"))
    plan = mine(embedding_source(emb, True), bare, tmp_path / "plans", report=False)
    with pytest.raises(InputError, match="holds no texts"):
        export_plan(plan, tmp_path / "x")
    texts = write_jsonl(tmp_path / "texts.jsonl", [{"id": str(i), **r} for i, r in
                                                   enumerate(rows)])
    ds = datasets.load_from_disk(str(export_plan(plan, tmp_path / "st", texts=texts)))
    assert ds.column_names == ["anchor", "positive"]
    assert ds["anchor"][0] == rows[plan.batch_rows(0)[0][0]]["query"]
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"id": f"x{i}", **r} for i, r in
                                                   enumerate(rows)])
    with pytest.raises(InputError, match="not the rows the plan was mined from"):
        export_plan(plan, tmp_path / "y", texts=wrong)


def test_a_mixture_exports_each_datasets_texts(tmp_path) -> None:
    from b3mine.mixture import MixtureDataset, mine_mixture
    from b3mine.teacher import embedding_source

    parts = []
    for i, n in enumerate((16, 32)):
        rows = pair_rows(n, prefix=f"ds{i} ")
        emb = fake_embeddings(tmp_path / f"d{i}.parquet", rows, seed=i)
        parts.append(MixtureDataset(name=f"d{i}", embeddings=embedding_source(emb, True)))
    plan = mine_mixture(parts, MiningConfig(batch_size=16, cluster_size=8, p=1, m=8),
                        tmp_path / "plans", report=False)
    ds = datasets.load_from_disk(str(export_plan(plan, tmp_path / "st")))
    assert len(ds) == 3 * 16
    for b in range(3):
        assert len({a.split()[0] for a in ds["anchor"][16 * b: 16 * (b + 1)]}) == 1


@pytest.mark.slow
def test_exported_dataset_trains_with_multiple_negatives_ranking_loss(tmp_path, text_plan):
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("accelerate")
    import torch
    from sentence_transformers import (SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments)
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from b3mine.teacher import load_teacher

    plan, rows = text_plan
    train = datasets.load_from_disk(str(export_plan(plan, tmp_path / "st", epochs=[0])))
    model = load_teacher(None, device="cpu")
    seen: list[list[int]] = []

    from torch.utils.data import BatchSampler, SequentialSampler

    class Recording(BatchSampler):
        def __iter__(self):
            for batch in super().__iter__():
                seen.append(batch)
                yield batch

    def recording(dataset, batch_size, drop_last, **_):  # sequential_batches, recorded
        return Recording(SequentialSampler(dataset), batch_size, drop_last=False)

    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=plan.batch_size,
        learning_rate=1e-5, batch_sampler=recording, report_to=[], save_strategy="no",
        use_cpu=True, dataloader_num_workers=0, seed=0)
    before = model[0].auto_model.embeddings.word_embeddings.weight.detach().clone()
    torch.manual_seed(0)
    result = SentenceTransformerTrainer(model=model, args=args, train_dataset=train,
                                        loss=MultipleNegativesRankingLoss(model)).train()
    assert result.global_step == 2 and np.isfinite(result.training_loss)
    assert not torch.equal(before, model[0].auto_model.embeddings.word_embeddings.weight)
    # The batches trained on are the plan's first two, row for row.
    assert seen[0] == list(range(16)) and seen[1] == list(range(16, 32))
    assert [train[i]["anchor"] for i in seen[0]] == [rows[r]["query"]
                                                     for r in plan.batch_rows(0)[0]]
