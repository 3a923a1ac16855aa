"""The reference trainer (`b3mine train`): end to end on a small corpus, exact resume, metrics,
the baseline samplers, and the methods-library options wired in.

The corpus is 400 real stdlib name -> docstring pairs (the demo's texts) with stand-in
"teacher" vectors (hashed bags of words), so the tests need neither the teacher's 1-minute
embedding pass nor a cached demo file; plans are really mined on the train split.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trainers.train.batching import KMeansBatchSampler, RandomBatchSampler
from trainers.train.config import AdapterConfig, TrainConfig
from trainers.train.evaluate import positive_ranks, retrieval_metrics
from trainers.train.loop import train

DIM = 64


def _hashed(text: str) -> np.ndarray:
    v = np.zeros(DIM, np.float32)
    for w in text.lower().replace("_", " ").split():
        v[int.from_bytes(hashlib.md5(w.encode()).digest()[:4], "little") % DIM] += 1.0
    v += 1e-3  # no all-zero rows
    return v / np.linalg.norm(v)


@pytest.fixture(scope="module")
def pairs_path(tmp_path_factory) -> Path:
    from b3mine.demo import build_corpus

    pairs = build_corpus(max_pairs=400)
    q = np.stack([_hashed(p.query) for p in pairs])
    t = np.stack([_hashed(p.target) for p in pairs])

    def col(m: np.ndarray) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(pa.array(m.reshape(-1), pa.float32()), DIM)

    path = tmp_path_factory.mktemp("pairs") / "pairs.parquet"
    pq.write_table(pa.table({"id": [p.id for p in pairs], "query_text": [p.query for p in pairs],
                             "target_text": [p.target for p in pairs], "query_embedding": col(q),
                             "target_embedding": col(t)}), path)
    return path


@pytest.fixture(autouse=True)
def _token_cache(tmp_path_factory, monkeypatch) -> None:
    monkeypatch.setenv("B3MINE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def config(pairs_path: Path, out: Path, **kw) -> TrainConfig:
    # the from-scratch student: these tests are about the trainer, not the default model
    base = dict(model="student", data=str(pairs_path), batch_size=32, steps=8, p=3, m=30, seed=1,
                output_dir=str(out), plans_dir=str(out.parent / "plans"), progress=False)
    return TrainConfig(**{**base, **kw})


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_trains_on_a_mined_train_split_plan_and_writes_its_files(pairs_path, tmp_path):
    r = train(config(pairs_path, tmp_path / "run", eval_every=4))
    assert r.steps == 8 and len(r.losses) == 8 and all(np.isfinite(r.losses))
    assert r.sampler["sampler"] == "plan" and r.sampler["hardness_vs_random"] > 1
    assert r.sampler["hard_negatives"]  # by default the mined plan has HNPS and they are used
    for name in ("config.json", "checkpoint.pt", "results.json", "metrics.jsonl"):
        assert (tmp_path / "run" / name).is_file(), name
    lines = read_metrics(tmp_path / "run")
    train_lines = [x for x in lines if x["type"] == "train"]
    assert [x["step"] for x in train_lines] == list(range(1, 9))
    assert set(train_lines[0]) >= {"step", "loss", "lr", "seconds"}
    evals = [x for x in lines if x["type"] == "eval"]
    assert [x["step"] for x in evals] == [4, 8]
    assert set(evals[-1]) >= {"recall@1", "recall@10", "mrr"} and evals[-1]["mrr"] > 0
    # The plan was mined on the train rows only: no held-out id is in any batch.
    from trainers.plans import LocalPlan
    from trainers.train.data import load_pairs

    cfg = config(pairs_path, tmp_path / "run")
    data = load_pairs(cfg)
    plan = LocalPlan(Path(cfg.plans_dir) / r.sampler["plan_id"])
    assert plan.n_rows == len(data.train)
    assert not set(plan.epoch_table(0).column("id").to_pylist()) & set(data.eval.ids.tolist())


@pytest.mark.parametrize("sampler", ["plan", "random", "kmeans"])
def test_resume_continues_exactly(pairs_path, tmp_path, sampler):
    whole = train(config(pairs_path, tmp_path / "whole", sampler=sampler, steps=10))
    cfg = config(pairs_path, tmp_path / "cut", sampler=sampler, steps=10)
    first = train(cfg, stop_after=4)
    assert first.steps == 4 and first.losses == whole.losses[:4]
    rest = train(cfg, resume=True)
    assert rest.steps == 10
    assert rest.losses == whole.losses[4:]  # bitwise: same batches, same state, one thread
    assert rest.metrics == whole.metrics
    steps = [x["step"] for x in read_metrics(tmp_path / "cut") if x["type"] == "train"]
    assert steps == list(range(1, 11))  # no duplicated lines from the interrupted part


def test_resume_refuses_another_config(pairs_path, tmp_path):
    train(config(pairs_path, tmp_path / "run", sampler="random"), stop_after=2)
    with pytest.raises(ValueError, match="different config"):
        train(config(pairs_path, tmp_path / "run", sampler="random", lr=1e-2), resume=True)


def test_a_given_plan_without_negatives_trains_on_its_batches_alone(pairs_path, tmp_path):
    from trainers.train.data import load_pairs
    from trainers.train.sampling import mine_train_plan

    bare = config(pairs_path, tmp_path / "mine", hard_negatives=False)
    plan = mine_train_plan(bare, load_pairs(bare))
    assert plan.config.negatives.mode == "none"
    r = train(config(pairs_path, tmp_path / "auto", plan=str(plan.path), steps=2))
    assert r.sampler["hard_negatives"] is False  # the default asks only when the plan has some
    with pytest.raises(ValueError, match="has no extra negatives"):
        train(config(pairs_path, tmp_path / "asked", plan=str(plan.path), steps=2,
                     hard_negatives=True))


def test_a_plan_mined_on_the_full_corpus_is_refused(pairs_path, tmp_path):
    from b3mine.config import MiningConfig
    from b3mine.mining import mine
    from trainers.plans import PlanDatasetMismatch

    plan = mine(_full_source(pairs_path),
                MiningConfig(batch_size=32, cluster_size=8, p=3, m=30), tmp_path / "plans",
                report=False)
    with pytest.raises(PlanDatasetMismatch):
        train(config(pairs_path, tmp_path / "run", plan=str(plan.path)))


def _full_source(path: Path):
    from b3mine.config import EmbeddingSource

    return EmbeddingSource(path=str(path), column="query_embedding",
                           target_column="target_embedding")


def test_retrieval_metrics_by_hand():
    e = np.eye(5, dtype=np.float32)
    assert retrieval_metrics(e, e) == {"recall@1": 1.0, "recall@10": 1.0, "mrr": 1.0,
                                       "ndcg@10": 1.0}
    # Query 0 scores target 1 (0.8) above its own (0.6); the others rank theirs first.
    q = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    t = np.array([[0.6, 0.0, 0.8], [0.8, 0.6, 0.0], [0.0, 0.0, 1.0]])
    t = t / np.linalg.norm(t, axis=1, keepdims=True)
    assert positive_ranks(q, t).tolist() == [2, 1, 1]
    m = retrieval_metrics(q, t, ks=(1, 2))
    assert m["recall@1"] == pytest.approx(2 / 3, abs=1e-6) and m["recall@2"] == 1.0
    assert m["mrr"] == pytest.approx((0.5 + 1 + 1) / 3, abs=1e-6)
    assert m["ndcg@10"] == pytest.approx((1 / np.log2(3) + 1 + 1) / 3, abs=1e-6)
    # A collapsed model (all embeddings equal) ranks every positive last: ties count against it.
    same = np.ones((4, 3))
    assert retrieval_metrics(same, same)["recall@1"] == 0.0


def test_kmeans_sampler_yields_each_example_once_per_epoch():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 16)).astype(np.float32)
    s = KMeansBatchSampler.fit(x, batch_size=32, cluster_size=8, seed=3, drop_last=False)
    for epoch in range(3):
        s.set_epoch(epoch)
        rows = np.concatenate([np.asarray(b) for b in s])
        assert sorted(rows.tolist()) == list(range(200))
    # Batches are made of whole topics: far fewer topics per batch than a random batch has.
    full = [b for b in s.batches(0) if len(b) == 32]
    per_batch = np.mean([len(np.unique(s.labels[b])) for b in full])
    assert per_batch < 8
    # drop_last: 6 full batches of distinct rows, and the state resumes mid-epoch.
    s = KMeansBatchSampler(s.labels, batch_size=32, seed=3)
    it = iter(s)
    seen = [next(it), next(it)]
    t = KMeansBatchSampler(s.labels, batch_size=32, seed=3)
    t.load_state_dict(s.state_dict())
    rest = list(t)
    rows = np.concatenate(seen + rest)
    assert len(seen) + len(rest) == 6 and len(np.unique(rows)) == 192
    r = RandomBatchSampler(100, 10, seed=1)
    assert sorted(np.concatenate(list(r)).tolist()) == list(range(100))


def test_objectives_gradcache_and_adapter_phases_run(pairs_path, tmp_path):
    plain = train(config(pairs_path, tmp_path / "plain", sampler="random", steps=4))
    cached = train(config(pairs_path, tmp_path / "gc", sampler="random", steps=4,
                          gradcache_chunk=8))
    # GradCache computes the same full-batch gradient: the same trajectory up to rounding.
    np.testing.assert_allclose(cached.losses, plain.losses, rtol=1e-4)
    for objective in ("sogclr", "em"):
        r = train(config(pairs_path, tmp_path / objective, sampler="random", steps=4,
                         objective=objective))
        assert len(r.losses) == 4 and all(np.isfinite(r.losses))
    r = train(config(pairs_path, tmp_path / "adapter", sampler="random", steps=4,
                     adapter=AdapterConfig(adapter_steps=3, adapter_batch_size=128,
                                           transfer_steps=2, transfer_batch_size=64,
                                           transfer_chunk=16)))
    phases = [x.get("phase") for x in read_metrics(tmp_path / "adapter") if x["type"] == "train"]
    assert phases == [None] * 4 + ["adapt"] * 3 + ["transfer"] * 2 and r.steps == 9


def test_b3mine_train_command(pairs_path, tmp_path):
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "-m", "b3mine.cli", "train", "--data", str(pairs_path),
                        "--sampler", "kmeans", "--batch-size", "32", "--steps", "3",
                        "--output-dir", str(out), "--no-progress"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "recall@1" in r.stdout and (out / "checkpoint.pt").is_file()
    assert json.loads((out / "results.json").read_text())["steps"] == 3
    before = (out / "metrics.jsonl").read_text()

    # A fresh run over the previous one is refused (nothing touched) unless --overwrite.
    again = [sys.executable, "-m", "b3mine.cli", "train", "--data", str(pairs_path),
             "--batch-size", "32", "--steps", "2", "--output-dir", str(out), "--no-progress",
             "--p", "2", "--m", "20"]
    r = subprocess.run(again, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"file {out}: holds a previous run (checkpoint.pt, metrics.jsonl, results.json, " \
           "config.json): pass --resume to continue it, --overwrite to replace it" in r.stderr
    assert (out / "metrics.jsonl").read_text() == before
    # the defaults (static student, plan + HNPS + curriculum); the distilled student is the
    # one cached for the user (as test_static_student uses it), not distilled again here
    env = {k: v for k, v in os.environ.items() if k != "B3MINE_CACHE"}
    r = subprocess.run(again + ["--overwrite"], capture_output=True, text=True, timeout=600,
                       cwd=tmp_path, env=env)  # the mined plan goes to ./.b3mine/plans
    assert r.returncode == 0, r.stderr
    saved = json.loads((out / "config.json").read_text())
    assert (saved["sampler"], saved["p"], saved["m"], saved["steps"]) == ("plan", 2, 20, 2)
    plan_id = json.loads((out / "results.json").read_text())["sampler"]["plan_id"]
    plan = json.loads((tmp_path / ".b3mine" / "plans" / plan_id / "manifest.json").read_text())
    assert (plan["config"]["p"], plan["config"]["m"]) == (2, 20)
    assert plan["config"]["negatives"]["mode"] == "hnps" and plan["config"]["curriculum"] == 0.5
    assert saved["model"] == "static"


def test_train_help_explains_the_p_default():
    import typing

    from trainers.cli import train as command

    help_text = typing.get_type_hints(command, include_extras=True)["p"].__metadata__[0].help
    assert f"default {TrainConfig().p}" in help_text and "b3mine mine" in help_text


@pytest.mark.parametrize("sampler", ["plan", "random", "kmeans"])
def test_duplicate_ids_in_the_pairs_file_are_refused_naming_file_rows(pairs_path, tmp_path,
                                                                       sampler):
    from b3mine.errors import InputError

    table = pq.read_table(pairs_path)
    ids = table.column("id").to_pylist()
    ids[250] = ids[7]  # file rows 7 and 250; both may land anywhere in the train split
    path = tmp_path / "dup.parquet"
    pq.write_table(table.set_column(0, "id", pa.array(ids)), path)
    with pytest.raises(InputError, match=re.escape(f"file {path}, row 250: duplicate id "
                                                   f"{ids[7]!r}, first seen at row 7")):
        train(config(path, tmp_path / "run", sampler=sampler))


def test_defaults_are_the_benchmarks_best_and_reach_the_mined_plan():
    from trainers.train.sampling import mining_config

    cfg = TrainConfig(batch_size=32, steps=100)
    # README, quality benchmark: static student, tau 0.1, plan + HNPS + curriculum over 50%
    assert (cfg.model, cfg.loss_temperature, cfg.hard_negatives) == ("static", 0.1, None)
    mined = mining_config(cfg, n_train=1000)  # 31 batches an epoch
    assert mined.negatives.mode == "hnps" and mined.curriculum == 0.5
    # the ramp is a share of the plan's batches: the plan holds exactly the epochs 100 steps need
    assert mined.epochs == 4
    plain = mining_config(TrainConfig(batch_size=32, steps=100, curriculum=0,
                                      hard_negatives=False), 1000)
    assert (plain.epochs, plain.curriculum, plain.negatives.mode) == (5, 0.0, "none")
    assert TrainConfig(model="student").loss_temperature == 0.05
