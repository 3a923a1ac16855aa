"""Which batches a run trains on: a B3 plan (mined on the train split, or given), random
batches, or TAS-style k-means batches. `build_sampler` returns the sampler and a description
for the logs.

A mined plan uses the demo's settings (p=10, m=100, METIS, affinity grouping by default) with
K = ``config.plan_cluster_size`` (B/4, at most 32: four clusters per batch at B=32 and B=128,
where K=32 at B=32 would make every batch a single cluster). It is mined from the teacher
embeddings of the train rows only, so no held-out pair shapes a training batch; the plan id
caches it under ``config.plans_dir``. A given plan (directory or URL) is matched to the train
rows by id: a plan mined on the full corpus is refused, because its held-out ids are missing
from the train split.
"""
from __future__ import annotations

import math
from typing import Any

from trainers.train.batching import KMeansBatchSampler, RandomBatchSampler
from trainers.train.config import TrainConfig
from trainers.train.data import PairData


def mining_config(config: TrainConfig, n_train: int) -> Any:
    from b3mine.config import MiningConfig, NegativesConfig

    per_epoch = max(1, n_train // config.batch_size)
    # Enough epochs for every step to see a freshly grouped batch; the sampler cycles if the
    # clustering dropped a few rows and the estimate falls short. A curriculum is a share of
    # the plan's batches, so its plan holds exactly the epochs the steps need.
    epochs = min(256, math.ceil(config.steps / per_epoch) + (0 if config.curriculum else 1))
    return MiningConfig(
        batch_size=config.batch_size, cluster_size=config.plan_cluster_size, p=config.p,
        m=config.m, algorithm="metis", batch_grouping=config.batch_grouping, epochs=epochs,
        seed=config.seed, curriculum=config.curriculum,
        negatives=NegativesConfig(mode="none" if config.hard_negatives is False else "hnps"))


def mine_train_plan(config: TrainConfig, data: PairData) -> Any:
    """Mine (or reuse, by plan id) the B3 plan of the train split; returns the `BatchPlan`."""
    from b3mine.embeddings import Embeddings
    from b3mine.mining import mine
    from b3mine.plan import PlanLineage

    tr = data.train
    emb = Embeddings.from_arrays(tr.ids, tr.query_emb, tr.target_emb,
                                 source=f"{data.source}#train")
    return mine(emb, mining_config(config, len(tr)), config.plans_dir, report=True,
                lineage=PlanLineage(kind="teacher"))


def build_sampler(config: TrainConfig, data: PairData) -> tuple[Any, dict[str, Any]]:
    """(sampler over train rows, a dict describing it for the logs)."""
    n = len(data.train)
    if config.sampler == "random":
        s = RandomBatchSampler(n, config.batch_size, seed=config.seed)
        return s, {"sampler": "random", "batches_per_epoch": s.batches_per_epoch}
    if config.sampler == "kmeans":
        s = KMeansBatchSampler.fit(data.train.target_emb, config.batch_size,
                                   config.plan_cluster_size, seed=config.seed)
        return s, {"sampler": "kmeans", "topics": len(s.topics),
                   "batches_per_epoch": s.batches_per_epoch}
    from trainers.samplers import PlanBatchSampler
    from trainers.sources import open_source

    source = open_source(config.plan if config.plan else mine_train_plan(config, data))
    negatives = source.has_negatives if config.hard_negatives is None else config.hard_negatives
    sampler = PlanBatchSampler(source, ids=data.train.ids.tolist(), negatives=negatives,
                               on_exhausted="cycle", rank=0, world_size=1)
    if sampler.source.batch_size != config.batch_size:
        raise ValueError(f"plan {sampler.plan_id} was mined with batch_size "
                         f"{sampler.source.batch_size}, the run asks for {config.batch_size}: "
                         f"pass --batch-size {sampler.source.batch_size}")
    info: dict[str, Any] = {"sampler": "plan", "plan_id": sampler.plan_id,
                            "hard_negatives": negatives,
                            "batches_per_epoch": sampler.source.batches_per_epoch,
                            "plan_epochs": sampler.epochs}
    quality = sampler.source.manifest.stats.get("quality") or {}
    if "mean_similarity_ratio" in quality:
        info["hardness_vs_random"] = quality["mean_similarity_ratio"]
    return sampler, info
