"""Clusters -> batches: C = B/K clusters per batch, re-drawn every epoch from a seeded RNG.

B3's official code fixes which clusters share a batch for the whole run; drawing a fresh
permutation per epoch gives every cluster new batch-mates while keeping each batch as hard.

>>> import numpy as np
>>> members = np.arange(12).reshape(6, 2)
>>> b = assemble_batches(members, np.zeros_like(members, bool), batch_size=4, epochs=2, seed=0,
...                      last_batch="drop")
>>> b.rows.shape
(2, 3, 4)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Batches:
    rows: np.ndarray  # (E, nb, B) int64 dataset rows
    cluster: np.ndarray  # (E, nb, B) int32 cluster of each position
    padded: np.ndarray  # (E, nb, B) bool: a repeat added to fill the last batch or cluster

    @property
    def batches_per_epoch(self) -> int:
        return self.rows.shape[1]


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """Independent stream per epoch: epoch e's batches do not depend on how many epochs exist."""
    return np.random.default_rng([seed, 0xB3, epoch])


def epoch_cluster_order(
    n_clusters: int, clusters_per_batch: int, seed: int, epoch: int, last_batch: str
) -> tuple[np.ndarray, np.ndarray]:
    """Cluster ids of each batch position group, (nb, C), and which of them are fill-ins."""
    rng = epoch_rng(seed, epoch)
    order = rng.permutation(n_clusters)
    full, rest = divmod(n_clusters, clusters_per_batch)
    if last_batch == "fill" and rest:
        used = order[: full * clusters_per_batch]
        need = clusters_per_batch - rest
        pool = used if len(used) else order  # fewer clusters than one batch: repeat its own
        extra = rng.choice(pool, size=need, replace=len(pool) < need)
        order = np.concatenate([order, extra])
        fill = np.zeros(len(order), bool)
        fill[n_clusters:] = True
        full += 1
    else:
        order = order[: full * clusters_per_batch]
        fill = np.zeros(len(order), bool)
    shape = (full, clusters_per_batch)
    return order.reshape(shape), fill.reshape(shape)


def assemble_batches(
    members: np.ndarray,
    member_padded: np.ndarray,
    *,
    batch_size: int,
    epochs: int,
    seed: int,
    last_batch: str,
) -> Batches:
    """Group clusters into batches for each epoch (see module doc)."""
    n_clusters, k = members.shape
    if batch_size % k:
        raise ValueError(f"batch_size {batch_size} is not a multiple of cluster size {k}")
    cpb = batch_size // k
    orders = [epoch_cluster_order(n_clusters, cpb, seed, e, last_batch) for e in range(epochs)]
    nb = orders[0][0].shape[0] if orders else 0
    rows = np.empty((epochs, nb, batch_size), np.int64)
    cluster = np.empty((epochs, nb, batch_size), np.int32)
    padded = np.empty((epochs, nb, batch_size), bool)
    for e, (order, fill) in enumerate(orders):
        rows[e] = members[order].reshape(nb, batch_size)
        cluster[e] = np.repeat(order, k, axis=1).reshape(nb, batch_size)
        padded[e] = (member_padded[order] | fill[..., None]).reshape(nb, batch_size)
    return Batches(rows=rows, cluster=cluster, padded=padded)
