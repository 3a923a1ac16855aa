"""Baseline batch samplers: random batches and TAS-style k-means topic batches.

Both behave like `trainers.PlanBatchSampler` as far as the training loop cares: ``set_epoch``,
iteration yielding lists of train-row indices, ``state_dict``/``load_state_dict`` that resume on
the exact next batch, and ``batches_per_epoch``. Every epoch is a fresh permutation drawn from
``(seed, epoch)``, so a resumed run replays the same batches without storing them.

**TAS-style k-means batches** (TAS-Balanced, Hofstätter et al. 2021, simplified). Spherical
k-means (faiss) clusters the teacher's *target* embeddings of the train split into
``n_train // cluster_size`` topics, fitted once. Each epoch shuffles the topics and the members
inside each topic, lays the topics end to end and cuts the sequence into batches of B, then
shuffles the batch order. A batch therefore holds whole topics (or pieces of a big one): about
B / cluster_size topics, as a B3 batch holds B / K clusters, but which topics share a batch is
random, and topic sizes are k-means' (uneven), not exactly K. Every train example appears once
per epoch (the incomplete last batch is dropped unless ``drop_last=False``). What TAS-Balanced
adds on top (balancing pairs by their teacher margin inside a topic) is not reproduced: for the
single-positive pairs here it has no direct counterpart.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np


class _EpochSampler:
    """Shared epoch/resume bookkeeping; subclasses implement `_epoch_order`."""

    kind = "base"

    def __init__(self, n: int, batch_size: int, *, seed: int = 0, drop_last: bool = True) -> None:
        if batch_size < 1 or n < (batch_size if drop_last else 1):
            raise ValueError(f"{n} examples cannot fill a batch of {batch_size}")
        self.n, self.batch_size, self.seed, self.drop_last = n, batch_size, seed, drop_last
        self.epoch = 0
        self._resume_at = 0
        self._yielded = 0

    @property
    def batches_per_epoch(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full + (0 if self.drop_last or not rest else 1)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        raise NotImplementedError

    def batches(self, epoch: int) -> list[np.ndarray]:
        """All batches of ``epoch``, in order (pure function of seed and epoch)."""
        order = self._epoch_order(epoch)
        b = self.batch_size
        return [order[i : i + b] for i in range(0, b * self.batches_per_epoch, b)]

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._resume_at = 0
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches_per_epoch - self._resume_at

    def __iter__(self) -> Iterator[list[int]]:
        start, self._resume_at = self._resume_at, 0
        for k, batch in enumerate(self.batches(self.epoch)[start:], start):
            self._yielded = k + 1  # counted before yielding, as PlanBatchSampler does
            yield batch.tolist()

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "seed": self.seed, "epoch": self.epoch,
                "batches_yielded": self._yielded}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.kind or state.get("seed") != self.seed:
            raise ValueError(f"sampler state is for {state.get('kind')} seed {state.get('seed')}, "
                             f"this sampler is {self.kind} seed {self.seed}")
        self.epoch = int(state["epoch"])
        self._resume_at = self._yielded = int(state["batches_yielded"])


class RandomBatchSampler(_EpochSampler):
    """Uniformly random batches: a fresh permutation of the train rows each epoch."""

    kind = "random"

    def _epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, 0x5A]).permutation(self.n)


def kmeans_labels(vectors: np.ndarray, n_clusters: int, *, seed: int = 0,
                  niter: int = 20) -> np.ndarray:
    """Spherical k-means topic of each row (faiss, one thread so the result is reproducible)."""
    import faiss

    x = np.ascontiguousarray(vectors, dtype=np.float32)
    x = x / np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)
    n_clusters = max(1, min(n_clusters, len(x)))
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        km = faiss.Kmeans(x.shape[1], n_clusters, niter=niter, seed=seed, spherical=True,
                          min_points_per_centroid=1, max_points_per_centroid=1 << 20)
        km.train(x)
        _, labels = km.index.search(x, 1)
    finally:
        faiss.omp_set_num_threads(threads)
    return labels[:, 0].astype(np.int64)


class KMeansBatchSampler(_EpochSampler):
    """TAS-style batches: whole k-means topics laid end to end, cut into batches (module doc)."""

    kind = "kmeans"

    def __init__(self, labels: np.ndarray, batch_size: int, *, seed: int = 0,
                 drop_last: bool = True) -> None:
        self.labels = np.asarray(labels, dtype=np.int64)
        super().__init__(len(self.labels), batch_size, seed=seed, drop_last=drop_last)
        order = np.argsort(self.labels, kind="stable")
        bounds = np.flatnonzero(np.diff(self.labels[order])) + 1
        self.topics = np.split(order, bounds)

    @classmethod
    def fit(cls, target_embeddings: np.ndarray, batch_size: int, cluster_size: int, *,
            seed: int = 0, drop_last: bool = True) -> KMeansBatchSampler:
        """Cluster into ``n // cluster_size`` topics, then sample from them."""
        labels = kmeans_labels(target_embeddings, max(1, len(target_embeddings) // cluster_size),
                               seed=seed)
        return cls(labels, batch_size, seed=seed, drop_last=drop_last)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch, 0x7A5])
        topics = [self.topics[i] for i in rng.permutation(len(self.topics))]
        order = np.concatenate([rng.permutation(t) for t in topics])
        b = self.batch_size
        n_batches = -(-len(order) // b)
        # Shuffle whole batches, so the topics' order does not become a curriculum; the
        # incomplete tail (when there is one) stays last and is what drop_last removes.
        full = len(order) // b
        perm = np.concatenate([rng.permutation(full), np.arange(full, n_batches)])
        return np.concatenate([order[i * b : (i + 1) * b] for i in perm])
