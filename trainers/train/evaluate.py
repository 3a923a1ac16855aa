"""Retrieval metrics on held-out pairs: query i's only relevant target is target i.

Every held-out query is scored against every held-out target (cosine); the rank of its own
target gives recall@k (share ranked within the top k), MRR (mean of 1/rank) and NDCG@10 (one
relevant target: 1/log2(1 + rank) when rank <= 10, else 0). Ties count
against the query (a target scoring equal to the positive ranks ahead of it), so a collapsed
model cannot score well.

>>> import numpy as np
>>> e = np.eye(4, dtype=np.float32)
>>> retrieval_metrics(e, e)
{'recall@1': 1.0, 'recall@10': 1.0, 'mrr': 1.0, 'ndcg@10': 1.0}
"""
from __future__ import annotations

from typing import Any

import numpy as np


def positive_ranks(queries: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """1-based rank of target i among all targets for query i (ties ranked ahead of it)."""
    q = np.asarray(queries, dtype=np.float64)
    t = np.asarray(targets, dtype=np.float64)
    if q.shape != t.shape or q.ndim != 2:
        raise ValueError(f"queries and targets must be aligned (n, d) matrices, got "
                         f"{q.shape} and {t.shape}")
    scores = q @ t.T
    pos = np.diag(scores)
    return (scores >= pos[:, None]).sum(1)  # >= counts the positive itself, and every tie


def retrieval_metrics(queries: np.ndarray, targets: np.ndarray,
                      ks: tuple[int, ...] = (1, 10)) -> dict[str, float]:
    """recall@k for each k, MRR and NDCG@10, rounded to 6 digits."""
    ranks = positive_ranks(queries, targets)
    out: dict[str, float] = {f"recall@{k}": round(float((ranks <= k).mean()), 6) for k in ks}
    out["mrr"] = round(float((1.0 / ranks).mean()), 6)
    gain = np.where(ranks <= 10, 1.0 / np.log2(1.0 + ranks), 0.0)
    out["ndcg@10"] = round(float(gain.mean()), 6)
    return out


def evaluate_model(model: Any, split: Any) -> dict[str, float]:
    """Metrics of a `DualEncoder` on a `trainers.train.data.Split` (embeds both sides)."""
    import torch

    q = model.embed(torch.as_tensor(split.query_tokens, dtype=torch.long))
    t = model.embed(torch.as_tensor(split.target_tokens, dtype=torch.long))
    return retrieval_metrics(q.float().numpy(), t.float().numpy())


def teacher_metrics(split: Any) -> dict[str, float]:
    """The same metrics for the teacher's stored embeddings: the reference to beat."""
    return retrieval_metrics(split.query_emb, split.target_emb)
