"""Shared fixtures: small clustered synthetic embeddings and a real mined plan."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from b3mine.config import MiningConfig, NegativesConfig


def clustered_vectors(n: int, d: int, topics: int, seed: int = 0, noise: float = 0.5) -> np.ndarray:
    """Gaussian mixture: ``topics`` centres, unit-normalised points."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(topics, d))
    x = centres[rng.integers(0, topics, n)] + noise * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_embeddings(path: Path, ids, queries: np.ndarray, targets: np.ndarray | None = None,
                     fixed: bool = True) -> Path:
    def column(m: np.ndarray) -> pa.Array:
        flat = pa.array(m.reshape(-1), type=pa.float32())
        if fixed:
            return pa.FixedSizeListArray.from_arrays(flat, m.shape[1])
        offsets = pa.array(np.arange(0, m.size + 1, m.shape[1], dtype=np.int32))
        return pa.ListArray.from_arrays(offsets, flat)

    cols = {"id": pa.array(ids), "embedding": column(queries)}
    if targets is not None:
        cols["target"] = column(targets)
    pq.write_table(pa.table(cols), path)
    return path


@pytest.fixture(scope="session")
def corpus_path(tmp_path_factory) -> Path:
    """2,000 single-corpus examples, d=32, 40 topics, integer ids 1000.."""
    x = clustered_vectors(2000, 32, 40, seed=1)
    return write_embeddings(tmp_path_factory.mktemp("corpus") / "corpus.parquet",
                            np.arange(2000) + 1000, x)


@pytest.fixture(scope="session")
def small_config() -> MiningConfig:
    return MiningConfig(batch_size=128, cluster_size=16, p=3, m=20, epochs=2, seed=7,
                        negatives=NegativesConfig(mode="hnps", k=3))


@pytest.fixture(scope="session")
def small_plan(tmp_path_factory, corpus_path, small_config):
    """A real plan mined from ``corpus_path`` (read-only: copy it before mutating)."""
    from b3mine.mining import mine

    return mine(corpus_path, small_config, tmp_path_factory.mktemp("plans"))
