"""b3mine: hard-negative batch mining for contrastive learning (B3).

>>> from b3mine import MiningConfig, mine                         # doctest: +SKIP
>>> plan = mine("corpus.parquet", MiningConfig(batch_size=512), out="plans")  # doctest: +SKIP
>>> plan.batch_rows(epoch=0).shape                                 # doctest: +SKIP
"""
from __future__ import annotations

from b3mine.config import EmbeddingSource, MiningConfig, NegativesConfig, NeighbourConfig
from b3mine.errors import B3MineError, InputError, PlanError
from b3mine.plan import BatchPlan, list_plans

__version__ = "0.1.0"

__all__ = [
    "B3MineError",
    "BatchPlan",
    "EmbeddingSource",
    "InputError",
    "MiningConfig",
    "NegativesConfig",
    "NeighbourConfig",
    "PlanError",
    "embed",
    "list_plans",
    "load_embeddings",
    "mine",
]


def __getattr__(name: str):
    # Mining pulls in faiss/scipy; keep `import b3mine` light for trainers and the service.
    if name == "mine":
        from b3mine.mining import mine

        return mine
    if name == "embed":  # texts -> teacher embeddings (b3mine.teacher); needs b3mine[embed]
        from b3mine.teacher import embed

        return embed
    if name == "load_embeddings":
        from b3mine.embeddings import load_embeddings

        return load_embeddings
    raise AttributeError(f"module 'b3mine' has no attribute {name!r}")
