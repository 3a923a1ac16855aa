"""Batches with the plan's extra hard negatives, laid out the way the contrastive losses expect.

`PlanBatchSampler(..., negatives=True)` yields, per batch, the B dataset indices of its examples
followed by the indices of their extra hard negatives. Here they are split again: the queries
are the B examples, the targets are [the B examples' positives; the negatives' positives] (a
negative row's target text is the hard negative), and ``labels = arange(B)``: query i's
positive is target column i. That is the ``q (B x d), k (T x d), labels (B,)`` contract of
`trainers.losses.contrastive_loss` (and of sentence-transformers' MultipleNegativesRankingLoss
over [positives; negatives]).

>>> from trainers.collate import split_hard_negatives
>>> b = split_hard_negatives([10, 11, 12, 40, 41], n_positives=3)
>>> b.query_rows.tolist(), b.target_rows.tolist(), b.labels.tolist()
([10, 11, 12], [10, 11, 12, 40, 41], [0, 1, 2])
"""
from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class HardNegativeBatch:
    """Dataset indices of one batch: queries (B,), targets (T >= B,), labels (B,)."""

    query_rows: np.ndarray
    target_rows: np.ndarray
    labels: np.ndarray

    @property
    def n_negatives(self) -> int:
        return len(self.target_rows) - len(self.query_rows)


def split_hard_negatives(indices: Sequence[int], n_positives: int) -> HardNegativeBatch:
    """Split a sampler list ``[*positives, *negatives]`` into the loss layout."""
    indices = np.asarray(indices, dtype=np.int64)
    if not 0 < n_positives <= len(indices):
        raise ValueError(f"a batch of {len(indices)} indices cannot start with "
                         f"{n_positives} positives")
    return HardNegativeBatch(query_rows=indices[:n_positives], target_rows=indices,
                             labels=np.arange(n_positives, dtype=np.int64))


def _default_collate(items: list[Any]) -> Any:
    from torch.utils.data import default_collate

    return default_collate(items)


class HardNegativeCollator:
    """``collate_fn`` for a DataLoader driven by ``PlanBatchSampler(negatives=True)``.

    Each dataset item holds a query and a target (``query_key``/``target_key``: dict keys or
    tuple positions). Returns ``{"queries": ..., "targets": ..., "labels": LongTensor(B)}``
    where queries come from the first ``n_positives`` items and targets from every item, so
    ``targets[:B]`` are the positives and ``targets[B:]`` the hard negatives.

    >>> import torch
    >>> items = [{"q": torch.tensor([float(i)]), "t": torch.tensor([10.0 + i])} for i in range(3)]
    >>> out = HardNegativeCollator(2, query_key="q", target_key="t")(items)
    >>> out["queries"].shape, out["targets"].shape, out["labels"].tolist()
    (torch.Size([2, 1]), torch.Size([3, 1]), [0, 1])
    """

    def __init__(self, n_positives: int, *, query_key: Hashable = 0, target_key: Hashable = 1,
                 collate: Callable[[list[Any]], Any] | None = None) -> None:
        self.n_positives = n_positives
        self.query_key, self.target_key = query_key, target_key
        self.collate = collate or _default_collate

    @classmethod
    def for_sampler(cls, sampler: Any, **kwargs: Any) -> HardNegativeCollator:
        """The collator matching a `PlanBatchSampler` (its per-rank batch size)."""
        if not getattr(sampler, "negatives", False):
            raise ValueError("the sampler yields no negatives: build it with negatives=True")
        return cls(sampler.local_batch_size, **kwargs)

    def __call__(self, features: list[Any]) -> dict[str, Any]:
        import torch

        n = self.n_positives
        if len(features) < n:
            raise ValueError(f"batch of {len(features)} items, expected at least {n} positives "
                             f"(is n_positives the sampler's local_batch_size?)")
        return {
            "queries": self.collate([f[self.query_key] for f in features[:n]]),
            "targets": self.collate([f[self.target_key] for f in features]),
            "labels": torch.arange(n, dtype=torch.long),
        }
