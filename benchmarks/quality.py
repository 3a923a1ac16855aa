"""Which batches train the better retriever? B3 plans against random, no-duplicates, TAS-style
k-means and sentence-transformers' mined hard negatives, on a real corpus.

Corpus: WordNet 3.0 term -> definition pairs (`benchmarks/corpora.py`, Debian `wordnet-base`),
a hash subset of ``--max-pairs`` synsets embedded once by the packaged all-MiniLM-L6-v2.
Splits by salted id hash: **test** 10% (never seen by training or selection; every test
query ranks every test definition), **validation** ``VALIDATION_FRACTION`` of the rest (the
trainer's held-out split: chooses lr and temperature per sampler and batch size, and the
early-stopping step), **train** the remainder (plans, k-means and mined negatives see these
rows only).

Student: ``TrainConfig(model="static")``, a model2vec distillation of the teacher (the fast
*pretrained* regime). Each sampler trains for the same ``--steps`` at each batch size; the
validation MRR is measured every ``--eval-every`` steps and the best step's model is the one
tested. Grid (seed 0): every ``--lrs`` value at the first of ``--temperatures``, then the
other temperatures at the best lr; samplers with a ``family`` reuse that sampler's choice at
the same batch size. The chosen point is run with ``--plan-seeds`` (model seed fixed) and,
when more than one is given, ``--seeds`` (plan seed fixed), so the two sources of variance are
reported apart. "Plan seed" seeds whatever draws the batches: the random permutation,
k-means, the mined plan, the sampler of sentence-transformers. The static student is
pretrained and has no dropout, so its model seed changes nothing (measured: seeds 0, 1, 2 gave
identical metrics); the spread reported is the plan seeds'.

Samplers (``SAMPLERS``): random; ``nodup`` = sentence-transformers' NoDuplicatesBatchSampler
(the real class); ``kmeans`` = TAS-style topics; ``mhn`` = sentence-transformers'
``mine_hard_negatives`` (the real function, fed the stored teacher embeddings,
``relative_margin=0.05``, 5 negatives per example) on random batches with the
MultipleNegativesRankingLoss objective (one-directional InfoNCE over [positives; negatives],
what MNRL computes); B3 plans mined on the train split (K = B/4, METIS) with their variants:
grouping, p, HNPS, the plan-side false-negative options, the teacher-guided in-batch mask and
SogCLR; the guided mask on random batches; three-phase adapter training. Reference rows: the
frozen teacher and the untrained static student.

    python benchmarks/quality.py --quick           # smoke run: 2 samplers, 1 seed, few steps
    python benchmarks/quality.py                   # the README table (see its section)

Writes one JSON line per run and per summary to ``--results`` and the plot to ``--plot``.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.corpora import build_wordnet  # noqa: E402

VALIDATION_FRACTION = 0.05
GUIDE_MARGIN = 0.0
MHN_NEGATIVES = 5
MHN_RANGE_MAX = 50


@dataclass(frozen=True)
class Variant:
    label: str
    kind: str  # random | nodup | kmeans | mhn | plan
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides
    mining: dict[str, Any] = field(default_factory=dict)  # MiningConfig overrides (plans)
    family: str | None = None  # reuse this sampler's chosen lr / temperature (no own grid)


# Plan variants pin what TrainConfig's defaults (plan + HNPS + curriculum) would otherwise add.
NO_HNPS: dict[str, Any] = {"hard_negatives": False, "curriculum": 0.0}  # batches only
HNPS: dict[str, Any] = {"hard_negatives": True, "curriculum": 0.0}
SAMPLERS: dict[str, Variant] = {
    "random": Variant("random batches", "random"),
    "nodup": Variant("sentence-transformers NoDuplicatesBatchSampler", "nodup",
                     family="random"),
    "kmeans": Variant("TAS-style k-means topics", "kmeans", family="random"),
    "mhn": Variant("ST mine_hard_negatives (5/ex, rel. margin 0.05) + MNRL", "mhn",
                   {"symmetric": False}),
    "b3": Variant("B3 plan p=10, affinity grouping", "plan", NO_HNPS),
    "b3-random": Variant("B3 plan p=10, random grouping", "plan", NO_HNPS,
                         mining={"batch_grouping": "random"}, family="b3"),
    "b3-p30": Variant("B3 plan p=30, random grouping (b3mine mine default)", "plan", NO_HNPS,
                      mining={"p": 30, "batch_grouping": "random"}, family="b3"),
    "b3-hnps": Variant("B3 plan + HNPS negatives (5/ex)", "plan", HNPS),
    "b3-hnps-curriculum": Variant("B3 plan + HNPS, curriculum over 50% (b3mine train default)",
                                  "plan", {"hard_negatives": True, "curriculum": 0.5},
                                  family="b3-hnps"),
    "b3-hnps-random": Variant("B3 plan + HNPS, random grouping (global graph)", "plan",
                              {**HNPS, "batch_grouping": "random"},
                              family="b3-hnps"),
    "b3-hnps-regions": Variant("B3 plan + HNPS, random grouping, regions of <= 8,192 "
                               "rows (Dask)", "plan",
                               {**HNPS, "batch_grouping": "random"},
                               mining={"region_size": 8192}, family="b3-hnps"),
    "b3-dedup": Variant("B3 plan, near-duplicates removed (cos >= 0.95)", "plan", NO_HNPS,
                        mining={"near_duplicates": 0.95}, family="b3"),
    "b3-cap": Variant("B3 plan, in-batch similarity cap 0.8", "plan", NO_HNPS,
                      mining={"similarity_cap": 0.8}, family="b3"),
    "b3-mix": Variant("B3 plan, half of each batch random", "plan", NO_HNPS,
                      mining={"batch_mix": 0.5},
                      family="b3"),
    "b3-curriculum": Variant("B3 plan, curriculum random -> hard over 50%", "plan",
                             {**NO_HNPS, "curriculum": 0.5}, family="b3"),
    "b3-guide": Variant("B3 plan + teacher-guided mask", "plan",
                        {**NO_HNPS, "guide_margin": GUIDE_MARGIN},
                        family="b3"),
    "b3-sogclr": Variant("B3 plan + SogCLR", "plan",
                         {**NO_HNPS, "objective": "sogclr"}, family="b3"),
    "random-guide": Variant("random batches + teacher-guided mask", "random",
                            {"guide_margin": GUIDE_MARGIN}, family="random"),
    "random-adapter": Variant("random + adapter phases 2-3 at B=4096", "random",
                              {"adapter": {"adapter_steps": 30, "adapter_batch_size": 4096,
                                           "transfer_steps": 5, "transfer_batch_size": 4096,
                                           "transfer_chunk": 512}}, family="random"),
}
QUICK = ["random", "b3"]


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


class Bench:
    """Everything shared by the runs: data, the test split, cached neighbours and plans."""

    def __init__(self, dev: Path, test: Path, out: Path, steps: int, eval_every: int,
                 log: Any) -> None:
        import functools

        import trainers.static
        from trainers.train.config import TrainConfig
        from trainers.train.data import load_pairs, read_split

        # Every run builds its model from the same distilled table: load it from disk once
        # (the model copies the table's rows, so runs never share trained weights).
        trainers.static.load_static_student = functools.lru_cache(
            trainers.static.load_static_student)

        self.dev, self.out, self.steps, self.eval_every, self.log = dev, out, steps, eval_every, log
        probe = TrainConfig(data=str(dev), eval_fraction=VALIDATION_FRACTION, model="static")
        self.data = load_pairs(probe)
        self.test = read_split(test, probe.max_length)
        self._neighbours: Any = None
        self._mhn: dict[int, np.ndarray] = {}

    # -- batch sources -------------------------------------------------------------------------
    def neighbours(self, depth: int) -> Any:
        """Teacher rank lists of the train split, computed once (exact, cached on disk)."""
        from b3mine.config import NeighbourConfig
        from b3mine.neighbours import Neighbours, search

        tr = self.data.train
        if self._neighbours is None or self._neighbours.depth < depth:
            path = self.out / f"neighbours-{len(tr)}-{depth}.npz"
            if path.is_file():
                with np.load(path) as z:
                    self._neighbours = Neighbours(z["rows"], z["scores"])
            else:
                t0 = time.perf_counter()
                self._neighbours = search(tr.query_emb, tr.target_emb, depth,
                                          NeighbourConfig(index="flat", threads=1))
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp.npz")
                np.savez(tmp, rows=self._neighbours.rows, scores=self._neighbours.scores)
                tmp.replace(path)
                self.log({"neighbours_seconds": round(time.perf_counter() - t0, 1),
                          "depth": depth})
        nb = self._neighbours
        return Neighbours(nb.rows[:, :depth], nb.scores[:, :depth])

    def plan(self, cfg: Any, variant: Variant, plan_seed: int) -> tuple[Path, dict[str, Any]]:
        """Mine (or reuse) the train-split plan of ``variant`` with the stages of
        `b3mine.mining`, reusing one neighbour search for every variant."""
        from b3mine import mining
        from b3mine.embeddings import Embeddings
        from b3mine.plan import BatchPlan, plan_id_for
        from trainers.train.sampling import mining_config

        tr = self.data.train
        # exactly the epochs the run's steps need, so a curriculum spans the training
        epochs = max(1, math.ceil(cfg.steps / (len(tr) // cfg.batch_size)))
        config = mining_config(cfg, len(tr)).model_copy(update={
            **variant.mining, "seed": plan_seed, "epochs": epochs})
        config = type(config).model_validate(config.model_dump())  # re-validate the overrides
        emb = Embeddings.from_arrays(tr.ids, tr.query_emb, tr.target_emb,
                                     source=f"{self.dev}#train")
        fingerprint = emb.fingerprint()
        root = self.out / "plans"
        path = root / plan_id_for(fingerprint, config)
        if not (path / "manifest.json").is_file() and config.region_size is not None:
            path = self.region_plan(config, root)
        elif not (path / "manifest.json").is_file():
            emb = mining.prepare(emb, config)
            nb = self.neighbours(config.rank_depth)
            graph = mining.build_graph(nb, config)
            clusters = mining.make_clusters(graph, config,
                                            mining.near_duplicate_rows(emb, nb, config))
            batches = mining.make_batches(clusters, config, graph, emb)
            negatives = mining.make_negatives(emb, nb, clusters, config)
            mining.finish_plan(emb, fingerprint, config, graph, clusters, batches, negatives,
                               root)
        plan = BatchPlan.open(path)
        q = plan.manifest.stats.get("quality") or {}
        return path, {"plan_id": path.name, "dropped": plan.manifest.counts.remainder_dropped,
                      **{k: q[k] for k in ("mean_similarity_ratio", "above_positive_ratio")
                         if k in q}}

    def region_plan(self, config: Any, root: Path) -> Path:
        """Region-parallel mining needs the Dask engine: the train split goes to a Parquet file
        (ids and paired embeddings) that a 2-worker LocalCluster mines."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from b3mine.config import EmbeddingSource
        from pipelines import run_job

        tr = self.data.train
        src = self.out / f"train-split-{len(tr)}.parquet"
        if not src.is_file():
            def col(m: np.ndarray) -> pa.Array:
                return pa.FixedSizeListArray.from_arrays(
                    pa.array(np.ascontiguousarray(m, np.float32).reshape(-1)), m.shape[1])

            tmp = src.with_suffix(".tmp")
            pq.write_table(pa.table({"id": pa.array(tr.ids), "query": col(tr.query_emb),
                                     "target": col(tr.target_emb)}), tmp)
            tmp.replace(src)
        t0 = time.perf_counter()
        result = run_job(EmbeddingSource(path=str(src), column="query", target_column="target"),
                         config, root, workers=2, threads_per_worker=1)
        g = result.plan.manifest.stats.get("graph") or {}
        self.log({"region_plan": result.plan.plan_id, "seconds": round(time.perf_counter() - t0, 1),
                  "regions": g.get("regions"),
                  "window_entries_in_region": g.get("window_entries_in_region")})
        return result.plan.path

    def mined_negatives(self, plan_seed: int) -> np.ndarray:
        """(n_train, 5) rows whose targets sentence-transformers' `mine_hard_negatives` picked
        for each train query (-1 where it found too few), from the stored teacher embeddings."""
        if plan_seed in self._mhn:
            return self._mhn[plan_seed]
        path = self.out / f"mhn-{len(self.data.train)}-{MHN_RANGE_MAX}-{plan_seed}.npy"
        if path.is_file():
            self._mhn[plan_seed] = np.load(path)
            return self._mhn[plan_seed]
        import datasets
        from sentence_transformers.util import mine_hard_negatives

        tr = self.data.train
        t0 = time.perf_counter()
        ds = datasets.Dataset.from_dict({"query": tr.query_text, "target": tr.target_text})
        mined = mine_hard_negatives(ds, StoredTeacher(tr), anchor_column_name="query",
                                    positive_column_name="target", relative_margin=0.05,
                                    # the candidate window of the function's documented
                                    # example (its default for "top" is num_negatives + 1)
                                    range_max=MHN_RANGE_MAX,
                                    num_negatives=MHN_NEGATIVES, sampling_strategy="top",
                                    output_format="n-tuple", batch_size=1024, verbose=False)
        row_of_target: dict[str, int] = {}
        for i, t in enumerate(tr.target_text):
            row_of_target.setdefault(t, i)
        row_of_pair = {(q, t): i for i, (q, t) in enumerate(zip(tr.query_text, tr.target_text))}
        neg = np.full((len(tr), MHN_NEGATIVES), -1, np.int64)
        cols = [f"negative_{k + 1}" for k in range(MHN_NEGATIVES)]
        for rec in mined:
            i = row_of_pair[(rec["query"], rec["target"])]
            neg[i] = [row_of_target[rec[c]] for c in cols]
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, neg)
        tmp.replace(path)
        self._mhn[plan_seed] = neg
        self.log({"mine_hard_negatives_seconds": round(time.perf_counter() - t0, 1),
                  "rows_with_negatives": int((neg[:, 0] >= 0).sum()), "n_train": len(tr)})
        return neg

    # -- one run -------------------------------------------------------------------------------
    def run(self, name: str, b: int, lr: float, temperature: float, model_seed: int,
            plan_seed: int) -> dict[str, Any]:
        from trainers.train.config import TrainConfig
        from trainers.train.evaluate import evaluate_model
        from trainers.train.loop import Trainer

        v = SAMPLERS[name]
        t0 = time.perf_counter()
        base = dict(data=str(self.dev), eval_fraction=VALIDATION_FRACTION, model="static",
                    batch_size=b, steps=self.steps, lr=lr, temperature=temperature,
                    seed=model_seed, progress=False, threads=1,
                    output_dir=str(self.out / "runs" / f"{name}-b{b}"),
                    plans_dir=str(self.out / "plans"))
        info: dict[str, Any] = {}
        if v.kind == "plan":
            probe = TrainConfig(**base, sampler="plan", plan="-", **v.train)
            path, info = self.plan(probe, v, plan_seed)
            cfg = TrainConfig(**{**base, **v.train}, sampler="plan", plan=str(path))
        else:
            cfg = TrainConfig(**{**base, **v.train}, sampler="random")
        trainer = Trainer(cfg, self.data)
        n = trainer.n_train
        if v.kind == "random":
            from trainers.train.batching import RandomBatchSampler

            trainer.sampler = RandomBatchSampler(n, b, seed=plan_seed)
        elif v.kind == "kmeans":
            from trainers.train.batching import KMeansBatchSampler

            trainer.sampler = KMeansBatchSampler.fit(self.data.train.target_emb, b,
                                                     cfg.plan_cluster_size, seed=plan_seed)
        elif v.kind == "nodup":
            trainer.sampler = no_duplicates_sampler(self.data.train, b, plan_seed)
        elif v.kind == "mhn":
            neg = self.mined_negatives(0)
            trainer.sampler = MinedNegativesSampler(neg, b, plan_seed)
            trainer._split = trainer.sampler.split  # queries, [positives; negatives], labels
        val, test = trainer.data.eval, self.test
        zero = evaluate_model(trainer.model, val)
        best = {"step": 0, "val": zero, "state": copy.deepcopy(trainer.model.state_dict())}
        batches = trainer.batches()
        losses: list[float] = []
        while trainer.step < cfg.steps:
            losses.append(trainer.train_step(next(batches)))
            trainer.step += 1
            if trainer.step % self.eval_every == 0 or trainer.step == cfg.steps:
                m = evaluate_model(trainer.model, val)
                if m["mrr"] > best["val"]["mrr"]:
                    best = {"step": trainer.step, "val": m,
                            "state": copy.deepcopy(trainer.model.state_dict())}
        if cfg.adapter.adapter_steps or cfg.adapter.transfer_steps:
            from trainers.train.phases import run_adapter_phases

            trainer.model.load_state_dict(best["state"])  # phases 2-3 follow the best phase 1
            run_adapter_phases(trainer, _NullLog())
            m = evaluate_model(trainer.model, val)
            best = {"step": trainer.step, "val": m, "state": trainer.model.state_dict()}
        trainer.model.load_state_dict(best["state"])
        metrics = evaluate_model(trainer.model, test)
        hardness = in_batch_hardness(trainer, b)
        return {"sampler": name, "batch_size": b, "lr": lr, "temperature": temperature,
                "model_seed": model_seed, "plan_seed": plan_seed, "steps": cfg.steps,
                "best_step": best["step"], **{f"test_{k}": v for k, v in metrics.items()},
                **{f"val_{k}": v for k, v in best["val"].items()},
                "final_train_loss": round(statistics.fmean(losses[-20:]), 4),
                **hardness, **info, "seconds": round(time.perf_counter() - t0, 2)}


class _NullLog:
    def write(self, record: dict[str, Any]) -> None:
        pass


class StoredTeacher:
    """The packaged teacher as `mine_hard_negatives` uses it, answering ``encode_query`` /
    ``encode_document`` from the stored embeddings of the train split (every text it is asked
    about is one of them) instead of running MiniLM again; similarity is the teacher's own."""

    def __init__(self, split: Any) -> None:
        from b3mine.demo import load_teacher

        self._model = load_teacher()
        self._q = {t: split.query_emb[i] for i, t in enumerate(split.query_text)}
        self._t = {t: split.target_emb[i] for i, t in enumerate(split.target_text)}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def encode_query(self, texts: list[str], **_: Any) -> np.ndarray:
        return np.stack([self._q[t] for t in texts])

    def encode_document(self, texts: list[str], **_: Any) -> np.ndarray:
        return np.stack([self._t[t] if t in self._t else self._q[t] for t in texts])


def no_duplicates_sampler(split: Any, batch_size: int, seed: int) -> Any:
    """sentence-transformers' NoDuplicatesBatchSampler over the train texts: no batch holds
    the same query or definition text twice."""
    import datasets
    import torch
    from sentence_transformers.base.sampler import NoDuplicatesBatchSampler

    ds = datasets.Dataset.from_dict({"query": split.query_text, "target": split.target_text})
    return NoDuplicatesBatchSampler(ds, batch_size=batch_size, drop_last=True,
                                    generator=torch.Generator(), seed=seed,
                                    precompute_hashes=True)


class MinedNegativesSampler:
    """Random batches of the rows that have mined negatives; each batch is its B rows followed
    by their negatives' rows (the layout of `trainers.collate.split_hard_negatives`)."""

    def __init__(self, negatives: np.ndarray, batch_size: int, seed: int) -> None:
        self.neg, self.b, self.seed, self.epoch = negatives, batch_size, seed, 0
        self.rows = np.flatnonzero(negatives[:, 0] >= 0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        order = np.random.default_rng([self.seed, self.epoch, 0x3A]).permutation(self.rows)
        for i in range(0, len(order) - self.b + 1, self.b):
            rows = order[i : i + self.b]
            yield np.concatenate([rows, self.neg[rows].ravel()]).tolist()

    def split(self, batch: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        from trainers.collate import split_hard_negatives

        s = split_hard_negatives(batch, self.b)
        return s.query_rows, s.target_rows, s.labels


def in_batch_hardness(trainer: Any, b: int, n_batches: int = 48) -> dict[str, float]:
    """Teacher similarity between in-batch non-pairs of the run's first batches, and the share
    of them scoring above the query's own positive (false-negative risk, ALGORITHMS.md §7)."""
    from b3mine.report import batch_similarity

    tr = trainer.data.train
    trainer.sampler.set_epoch(0)
    rows = []
    for k, batch in enumerate(trainer.sampler):
        rows.append(np.asarray(batch[:b]))
        if k + 1 >= n_batches:
            break
    s = batch_similarity(tr.query_emb, tr.target_emb, np.stack(rows), max_batches=n_batches, rng=np.random.default_rng(0))
    return {"in_batch_similarity": round(s["mean"], 4),
            "above_positive_share": round(s["above_positive_share"], 5)}


def reference_rows(bench: Bench) -> list[dict[str, Any]]:
    """The frozen teacher and the untrained static student on the test split."""
    from trainers.train.config import TrainConfig
    from trainers.train.evaluate import evaluate_model, teacher_metrics
    from trainers.train.models import build_model

    cfg = TrainConfig(data=str(bench.dev), eval_fraction=VALIDATION_FRACTION, model="static")
    model = build_model(cfg, bench.data.vocab_size, (bench.data.train.query_tokens,
                                                     bench.data.train.target_tokens))
    return [{"reference": "teacher all-MiniLM-L6-v2 (frozen)",
             **{f"test_{k}": v for k, v in teacher_metrics(bench.test).items()}},
            {"reference": "static student, untrained (zero-shot)",
             **{f"test_{k}": v for k, v in evaluate_model(model, bench.test).items()}}]


METRICS = ("recall@1", "recall@10", "mrr", "ndcg@10")


def summarise(runs: list[dict[str, Any]], name: str, b: int) -> dict[str, Any]:
    chosen = [r for r in runs if r["sampler"] == name and r["batch_size"] == b
              and r.get("phase") == "seeds"]
    by_model = [r for r in chosen if r["plan_seed"] == 0]
    by_plan = [r for r in chosen if r["model_seed"] == 0]
    entry: dict[str, Any] = {"summary": name, "batch_size": b, "label": SAMPLERS[name].label,
                             "lr": chosen[0]["lr"], "temperature": chosen[0]["temperature"],
                             "runs": len(chosen)}
    entry["plan_seeds"] = len(by_plan)
    for k in METRICS:
        m, s = mean_std([r[f"test_{k}"] for r in by_plan])
        entry[k] = {"mean": round(m, 4), "std": round(s, 4)}
        entry[f"{k}_model_seed_std"] = (round(mean_std([r[f"test_{k}"] for r in by_model])[1],
                                              4) if len(by_model) > 1 else None)
        entry[f"val_{k}"] = round(statistics.fmean(r[f"val_{k}"] for r in by_plan), 4)
    for k in ("best_step", "in_batch_similarity", "above_positive_share", "seconds"):
        entry[k] = round(statistics.fmean(r[k] for r in by_plan), 4)
    return entry


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[32, 256])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0],
                    help="model seeds (at the first plan seed); the static student is "
                         "pretrained and has no dropout, so its model seed changes nothing "
                         "(measured: identical metrics for seeds 0, 1, 2)")
    ap.add_argument("--plan-seeds", nargs="+", type=int, default=[0, 1, 2],
                    help="plan seeds (at the first model seed), for --plan-seed-samplers")
    ap.add_argument("--plan-seed-samplers", nargs="*", default=list(SAMPLERS))
    ap.add_argument("--family-choice", nargs="*", default=[], metavar="NAME=LR,TEMP",
                    help="use this lr / temperature for NAME's family instead of its grid "
                         "(e.g. b3=0.03,0.1 when another process ran the grid)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--lrs", nargs="+", type=float, default=[0.01, 0.03, 0.1],
                    help="grid: every lr at the first temperature, then the other "
                         "temperatures at the best lr (validation MRR)")
    ap.add_argument("--temperatures", nargs="+", type=float, default=[0.05, 0.1])
    ap.add_argument("--max-pairs", type=int, default=50_000)
    ap.add_argument("--pairs", nargs=2, type=Path, metavar=("DEV", "TEST"),
                    help="any other corpus: dev and test Parquet files in the b3mine train "
                         "--data layout (default: WordNet via benchmarks/corpora.py)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: random and b3, B=32, 1 seed, 100 steps, one grid point")
    ap.add_argument("--prepare", action="store_true",
                    help="only build the corpus, the neighbours and the mined negatives")
    ap.add_argument("--summarize", nargs="+", type=Path, metavar="JSONL",
                    help="no training: table and plot from the runs in these files")
    ap.add_argument("--out", type=Path, default=Path(".b3mine/quality"))
    ap.add_argument("--results", type=Path, default=Path("benchmarks/results/quality.jsonl"))
    ap.add_argument("--plot", type=Path, default=Path("docs/img/quality.png"))
    a = ap.parse_args(argv)
    if a.quick:
        a.samplers, a.batch_sizes, a.seeds, a.plan_seeds = QUICK, [32], [0], [0]
        a.steps, a.eval_every, a.lrs, a.temperatures = 100, 50, a.lrs[:1], a.temperatures[:1]
        a.results, a.plot = a.out / "quality-quick.jsonl", a.out / "quality-quick.png"
    if a.summarize:
        records = [json.loads(line) for f in a.summarize for line in f.read_text().splitlines()
                   if line.strip()]
        return report(records, a)

    import datasets

    datasets.disable_progress_bars()
    start = time.perf_counter()
    a.results.parent.mkdir(parents=True, exist_ok=True)
    sink = a.results.open("w")

    def log(record: dict[str, Any]) -> None:
        line = json.dumps(record)
        print(line, flush=True)
        sink.write(line + "\n")
        sink.flush()

    if a.pairs:
        dev, test, corpus = a.pairs[0], a.pairs[1], str(a.pairs[0])
    else:
        files = build_wordnet(a.out / "corpus", a.max_pairs, progress=False)
        dev, test, corpus = files.dev, files.test, "wordnet-3.0"
    bench = Bench(dev, test, a.out, a.steps, a.eval_every, log)
    log({"corpus": corpus, "pairs": len(bench.data.train) + len(bench.data.eval)
         + len(bench.test), "train": len(bench.data.train), "validation": len(bench.data.eval),
         "test": len(bench.test), "steps": a.steps, "eval_every": a.eval_every, "lrs": a.lrs,
         "temperatures": a.temperatures, "seeds": a.seeds, "plan_seeds": a.plan_seeds,
         "machine": "2 shared CPU cores (other jobs running)"})
    if a.prepare:
        bench.neighbours(130)  # p=30 + m=100: the deepest window of the variants
        bench.mined_negatives(0)
        sink.close()
        return [{}]
    a.samplers = runnable(a.samplers, log)
    runs: list[dict[str, Any]] = [{"phase": "reference", **r} for r in reference_rows(bench)]
    for r in runs:
        log(r)
    for b in a.batch_sizes:
        chosen_by_family: dict[str, dict[str, Any]] = {}
        for item in a.family_choice:
            fam, values = item.split("=")
            lr, temp = (float(x) for x in values.split(","))
            chosen_by_family[fam] = {"lr": lr, "temperature": temp}
        for name in a.samplers:
            family = SAMPLERS[name].family
            chosen = chosen_by_family.get(family) if family else None
            if chosen is None:
                chosen = grid_search(bench, name, b, a, runs, log)
                chosen_by_family[name] = chosen
            else:
                chosen = {**bench.run(name, b, chosen["lr"], chosen["temperature"], a.seeds[0],
                                      a.plan_seeds[0]), "phase": "seeds",
                          "hyper_parameters_from": family}
                runs.append(chosen)
                log(chosen)
            pairs = [(m, a.plan_seeds[0]) for m in a.seeds[1:]]
            if name in a.plan_seed_samplers:
                pairs += [(a.seeds[0], p) for p in a.plan_seeds[1:]]
            for ms, ps in pairs:
                r = {**bench.run(name, b, chosen["lr"], chosen["temperature"], ms, ps),
                     "phase": "seeds"}
                runs.append(r)
                log(r)
    log({"total_seconds": round(time.perf_counter() - start, 1)})
    sink.close()
    return report(runs, a, write=False)


def runnable(names: list[str], log: Any) -> list[str]:
    """The samplers whose settings this checkout's TrainConfig accepts (others are logged and
    skipped, e.g. a method that has not landed yet)."""
    from pydantic import ValidationError

    from trainers.train.config import TrainConfig

    keep = []
    for name in names:
        try:
            TrainConfig(**SAMPLERS[name].train, sampler="plan")
            keep.append(name)
        except ValidationError as e:
            log({"skipped": name, "reason": str(e).splitlines()[1:3]})
    return keep


def grid_search(bench: Bench, name: str, b: int, a: Any, runs: list[dict[str, Any]],
                log: Any) -> dict[str, Any]:
    """Every lr at the first temperature, then the other temperatures at the best lr; the
    point with the best validation MRR (early-stopped) is kept as the seed-0 run."""
    seed, plan_seed = a.seeds[0], a.plan_seeds[0]

    def one(lr: float, temp: float) -> dict[str, Any]:
        r = {**bench.run(name, b, lr, temp, seed, plan_seed), "phase": "grid"}
        runs.append(r)
        log(r)
        return r

    grid = [one(lr, a.temperatures[0]) for lr in a.lrs]
    best_lr = max(grid, key=lambda r: r["val_mrr"])["lr"]
    grid += [one(best_lr, t) for t in a.temperatures[1:]]
    chosen = {**max(grid, key=lambda r: r["val_mrr"]), "phase": "seeds"}
    runs.append(chosen)
    log(chosen)
    return chosen


def report(records: list[dict[str, Any]], a: Any, write: bool = True) -> list[dict[str, Any]]:
    """Summaries (one JSON line each), the markdown table and the plot."""
    runs = [r for r in records if r.get("phase") == "seeds"]
    refs = list({r["reference"]: r for r in records if "reference" in r}.values())
    cells = list(dict.fromkeys((r["batch_size"], r["sampler"]) for r in runs))
    summary = [summarise(runs, name, b) for b, name in sorted(cells, key=lambda c: (
        c[0], list(SAMPLERS).index(c[1])))]
    lines = [json.dumps(e) for e in summary]
    print("\n".join(lines))
    if write:
        with a.results.open("w") as f:
            f.write("".join(f"{line}\n" for line in lines))
    print_table(summary, refs, a)
    batch_sizes = sorted({e["batch_size"] for e in summary})
    print(f"\nplot: {plot_summary(summary, refs, batch_sizes, a.plot)}")
    return records


def print_table(summary: list[dict[str, Any]], refs: list[dict[str, Any]], a: Any) -> None:
    n = max((e["plan_seeds"] for e in summary), default=0)
    print(f"\n| sampler | B | lr / τ | test recall@1 ({n} plan seeds) | recall@10 | MRR | "
          "NDCG@10 | val MRR | in-batch sim | > positive |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for e in summary:
        cells = " | ".join(f"{e[k]['mean']:.3f} ± {e[k]['std']:.3f}" for k in METRICS)
        print(f"| {e['label']} | {e['batch_size']} | {e['lr']:g} / {e['temperature']:g} | "
              f"{cells} | {e['val_mrr']:.4f} | {e['in_batch_similarity']:.3f} | "
              f"{100 * e['above_positive_share']:.2f}% |")
    for r in refs:
        cells = " | ".join(f"{r[f'test_{k}']:.3f}" for k in METRICS)
        print(f"| {r['reference']} | - | - | {cells} | - | - | - |")


def plot_summary(summary: list[dict[str, Any]], refs: list[dict[str, Any]],
                 batch_sizes: list[int], path: Path) -> Path:
    """Test recall@1 and NDCG@10 (mean ± std over plan seeds) per sampler and batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(e["summary"] for e in summary))
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.32 * len(names) * len(batch_sizes) + 2.5),
                             sharey=True)
    height = 0.8 / max(len(batch_sizes), 1)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric in zip(axes, ("recall@1", "ndcg@10")):
        for j, b in enumerate(batch_sizes):
            rows = {e["summary"]: e[metric] for e in summary if e["batch_size"] == b}
            ys = [i + j * height for i, n in enumerate(names) if n in rows]
            ax.barh(ys, [rows[n]["mean"] for n in names if n in rows], height,
                    xerr=[rows[n]["std"] for n in names if n in rows], capsize=2,
                    color=colours[j % len(colours)], label=f"batch {b}")
        for r, style in zip(refs, ("--", ":")):
            ax.axvline(r[f"test_{metric}"], color="black", linestyle=style, linewidth=1,
                       label=r["reference"])
        lows = [e[metric]["mean"] - 2 * e[metric]["std"] for e in summary]
        ax.set_xlim(max(0.0, min(lows + [r[f"test_{metric}"] for r in refs]) - 0.02), None)
        ax.set_xlabel(f"test {metric}")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks([i + height * (len(batch_sizes) - 1) / 2 for i in range(len(names))],
                       [SAMPLERS[n].label for n in names], fontsize=8)
    axes[0].invert_yaxis()
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle("WordNet term -> definition, static student (model2vec of MiniLM): "
                 "held-out test, mean ± std over 3 plan (batch) seeds (2 shared CPU cores)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
