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
import scipy.sparse as sp


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


def cluster_affinity(graph: sp.csr_matrix, members: np.ndarray) -> sp.csr_matrix:
    """(C, C) counts of graph edges between clusters (diagonal removed)."""
    n_clusters, k = members.shape
    rows = members.reshape(-1)
    cols = np.repeat(np.arange(n_clusters), k)
    onehot = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)),
                           shape=(graph.shape[0], n_clusters))
    onehot.data[:] = 1  # a padded repeat counts once
    aff = (onehot.T @ graph.astype(np.float32) @ onehot).tocsr()
    aff.setdiag(0)
    aff.eliminate_zeros()
    return aff


def affinity_permutation(affinity: sp.csr_matrix, clusters_per_batch: int,
                         rng: np.random.Generator) -> np.ndarray:
    """A cluster order whose consecutive runs of C clusters share many graph edges.

    Greedy and seeded: visit clusters in random order; each unassigned one starts a group and
    takes its most-connected unassigned neighbours (random tie-break). Groups that stay short
    are pooled at the end. A new seed per epoch gives new groups.
    """
    n = affinity.shape[0]
    free = np.ones(n, bool)
    groups: list[np.ndarray] = []
    short: list[int] = []
    jitter = rng.random(n)  # tie-break among equally connected neighbours
    for s in rng.permutation(n):
        if not free[s]:
            continue
        free[s] = False
        lo, hi = affinity.indptr[s], affinity.indptr[s + 1]
        nbr, w = affinity.indices[lo:hi], affinity.data[lo:hi]
        ok = free[nbr]
        nbr, w = nbr[ok], w[ok]
        take = nbr[np.lexsort((jitter[nbr], -w))][: clusters_per_batch - 1]
        free[take] = False
        group = np.concatenate([[s], take])
        if len(group) == clusters_per_batch:
            groups.append(group)
        else:
            short.extend(group.tolist())
    rng.shuffle(groups)
    rest = np.array(short, dtype=np.int64)
    return np.concatenate(groups + [rest]) if groups else rest


def epoch_cluster_order(
    n_clusters: int, clusters_per_batch: int, seed: int, epoch: int, last_batch: str,
    affinity: sp.csr_matrix | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Cluster ids of each batch position group, (nb, C), and which of them are fill-ins."""
    rng = epoch_rng(seed, epoch)
    if affinity is None:
        order = rng.permutation(n_clusters)
    else:
        order = affinity_permutation(affinity, clusters_per_batch, rng)
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
    affinity: sp.csr_matrix | None = None,
    mix: float = 0.0,
    curriculum: float = 0.0,
) -> Batches:
    """Group clusters into batches for each epoch (see module doc).

    With ``affinity`` (from :func:`cluster_affinity`), a batch is filled with clusters that share
    graph edges instead of random ones: harder batches, still re-drawn every epoch. ``mix`` and
    ``curriculum`` soften them (:func:`random_shares`, :func:`mix_rows`).
    """
    n_clusters, k = members.shape
    if batch_size % k:
        raise ValueError(f"batch_size {batch_size} is not a multiple of cluster size {k}")
    cpb = batch_size // k
    orders = [epoch_cluster_order(n_clusters, cpb, seed, e, last_batch, affinity)
              for e in range(epochs)]
    nb = orders[0][0].shape[0] if orders else 0
    rows = np.empty((epochs, nb, batch_size), np.int64)
    cluster = np.empty((epochs, nb, batch_size), np.int32)
    padded = np.empty((epochs, nb, batch_size), bool)
    for e, (order, fill) in enumerate(orders):
        rows[e] = members[order].reshape(nb, batch_size)
        cluster[e] = np.repeat(order, k, axis=1).reshape(nb, batch_size)
        padded[e] = (member_padded[order] | fill[..., None]).reshape(nb, batch_size)
    shares = random_shares(epochs, nb, mix, curriculum)
    if shares.any():
        for e in range(epochs):
            mix_rows(rows[e], cluster[e], padded[e], shares[e],
                     np.random.default_rng([seed, 0x313, e]))
    return Batches(rows=rows, cluster=cluster, padded=padded)


def random_shares(epochs: int, batches_per_epoch: int, mix: float, curriculum: float
                  ) -> np.ndarray:
    """(E, nb) share of each batch's rows to exchange for random rows.

    ``mix`` everywhere; with ``curriculum`` c > 0 the first c of all batches (in training
    order, epoch by epoch) fall linearly from fully random to ``mix``.

    >>> random_shares(2, 2, 0.25, 0.5).tolist()
    [[1.0, 0.625], [0.25, 0.25]]
    """
    total = epochs * batches_per_epoch
    shares = np.full(total, float(mix))
    if curriculum > 0 and total:
        ramp = max(1, round(curriculum * total))
        g = np.arange(total)
        shares = np.maximum(shares, np.where(g < ramp, 1 - (1 - mix) * g / ramp, 0.0))
    return shares.reshape(epochs, batches_per_epoch)


def mix_rows(rows: np.ndarray, cluster: np.ndarray, padded: np.ndarray, shares: np.ndarray,
             rng: np.random.Generator) -> None:
    """In place, for one epoch's (nb, B) arrays: pick ``round(share * B)`` random positions
    of each batch and deal the rows found there back out in a random order, so that share
    of a batch becomes random rows of the epoch (every row still appears once)."""
    nb, b = rows.shape
    counts = np.rint(np.asarray(shares) * b).astype(np.int64)
    if nb == 0 or not counts.any():
        return
    keys = rng.random((nb, b))
    picked = np.argsort(keys, axis=1) < counts[:, None]  # first `count` of a random order
    where = np.nonzero(picked)
    perm = rng.permutation(len(where[0]))
    for a in (rows, cluster, padded):
        a[where] = a[where][perm]


def cap_similarity(batches: Batches, queries: np.ndarray, targets: np.ndarray, cap: float,
                   seed: int, rounds: int = 8) -> tuple[Batches, int]:
    """Swap rows between batches until no batch pairs a query with another row's target of
    teacher similarity above ``cap``; returns the batches and how many such pairs are left.

    Per epoch and round: in each batch, the row in the most over-cap pairs is taken out until
    none is left (a greedy cover of the batch's conflicts), and all rows taken out in the
    epoch are dealt back into the freed slots in a random order. A few rounds settle almost
    every conflict, because a row's over-cap partners are a handful among the epoch."""
    rows, cluster, padded = (batches.rows.copy(), batches.cluster.copy(),
                             batches.padded.copy())
    left = 0
    for e in range(rows.shape[0]):
        rng = np.random.default_rng([seed, 0xCA9, e])
        for r in range(rounds + 1):
            taken = []
            for bi, batch in enumerate(rows[e]):
                s = queries[batch] @ targets[batch].T
                over = (s > cap) | (s.T > cap)
                np.fill_diagonal(over, False)
                over &= batch[:, None] != batch[None, :]  # a padded repeat is not a conflict
                degree = over.sum(1)
                while degree.any():
                    i = int(np.argmax(degree))
                    taken.append((bi, i))
                    degree -= over[i]
                    over[i, :] = over[:, i] = False
                    degree[i] = 0
            if not taken or r == rounds:
                left += len(taken)
                break
            where = tuple(np.array(taken).T)
            perm = rng.permutation(len(taken))
            for a in (rows[e], cluster[e], padded[e]):
                a[where] = a[where][perm]
    return Batches(rows=rows, cluster=cluster, padded=padded), left
