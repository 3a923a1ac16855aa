"""Embeddings input: every accepted layout, and every bad input named precisely."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from b3mine.config import EmbeddingSource, MiningConfig
from b3mine.embeddings import Embeddings, load_embeddings
from b3mine.errors import InputError
from tests.conftest import clustered_vectors, write_embeddings


@pytest.fixture
def x() -> np.ndarray:
    return clustered_vectors(50, 8, 4)


@pytest.mark.parametrize("fixed", [True, False])
def test_parquet_single_corpus(tmp_path, x, fixed):
    path = write_embeddings(tmp_path / "e.parquet", np.arange(50), x, fixed=fixed)
    emb = load_embeddings(path)
    assert emb.n_rows == 50 and emb.dim == 8 and not emb.paired
    np.testing.assert_array_equal(emb.queries, x)
    assert emb.ids.tolist() == list(range(50))


def test_parquet_paired_columns_and_string_ids(tmp_path, x):
    ids = [f"doc-{i}" for i in range(50)]
    path = write_embeddings(tmp_path / "e.parquet", ids, x, x[::-1].copy())
    emb = load_embeddings(EmbeddingSource(path=str(path), target_column="target"))
    assert emb.paired and emb.ids[3] == "doc-3"
    np.testing.assert_array_equal(emb.targets, x[::-1])


def test_parquet_paired_files_must_align(tmp_path, x):
    q = write_embeddings(tmp_path / "q.parquet", np.arange(50), x)
    t = write_embeddings(tmp_path / "t.parquet", np.arange(50), x)
    emb = load_embeddings(EmbeddingSource(path=str(q), target_path=str(t)))
    assert emb.paired
    bad = write_embeddings(tmp_path / "bad.parquet", np.r_[np.arange(49), 99], x)
    with pytest.raises(InputError, match=r"bad.parquet.*row 49"):
        load_embeddings(EmbeddingSource(path=str(q), target_path=str(bad)))


def test_parquet_directory_of_shards(tmp_path, x):
    (tmp_path / "shards").mkdir()
    write_embeddings(tmp_path / "shards" / "a.parquet", np.arange(25), x[:25])
    write_embeddings(tmp_path / "shards" / "b.parquet", np.arange(25, 50), x[25:])
    emb = load_embeddings(tmp_path / "shards")
    np.testing.assert_array_equal(emb.queries, x)


def test_npy_memory_mapped_with_id_file(tmp_path, x):
    np.save(tmp_path / "e.npy", x)
    (tmp_path / "ids.txt").write_text("\n".join(f"q{i}" for i in range(50)))
    emb = load_embeddings(EmbeddingSource(path=str(tmp_path / "e.npy"),
                                          ids_path=str(tmp_path / "ids.txt")))
    assert emb.ids[0] == "q0" and emb.queries.shape == (50, 8)


def test_normalize(tmp_path, x):
    emb = Embeddings.from_arrays(np.arange(50), x * 3, normalize=True)
    np.testing.assert_allclose(np.linalg.norm(emb.queries, axis=1), 1, rtol=1e-6)


# -- bad input: each names the file, the column and the row -----------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="nope.parquet: no such file"):
        load_embeddings(tmp_path / "nope.parquet")


def test_missing_column(tmp_path, x):
    path = write_embeddings(tmp_path / "e.parquet", np.arange(50), x)
    with pytest.raises(InputError, match=r"e.parquet, column 'vec': missing column"):
        load_embeddings(EmbeddingSource(path=str(path), column="vec"))


def test_inconsistent_dimension(tmp_path):
    table = pa.table({"id": [0, 1, 2], "embedding": [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0, 1.0]]})
    pq.write_table(table, tmp_path / "e.parquet")
    with pytest.raises(InputError, match=r"column 'embedding', row 2: inconsistent embedding "
                                         r"dimension \(expected dimension 2, got 3\)"):
        load_embeddings(tmp_path / "e.parquet")


def test_non_finite_value(tmp_path, x):
    x = x.copy()
    x[17, 3] = np.nan
    path = write_embeddings(tmp_path / "e.parquet", np.arange(50), x)
    # the error names the file's column, not the in-memory name ("queries")
    with pytest.raises(InputError, match=r"column 'embedding', row 17: embedding holds a NaN"):
        load_embeddings(path)
    np.save(tmp_path / "e.npy", x)
    np.save(tmp_path / "ids.npy", np.arange(50))
    with pytest.raises(InputError, match=r"e.npy, row 17: embedding holds") as info:
        load_embeddings(EmbeddingSource(path=str(tmp_path / "e.npy"),
                                        ids_path=str(tmp_path / "ids.npy")))
    assert "column" not in str(info.value)
    x[17] = 0
    with pytest.raises(InputError, match=r"column 'embedding', row 17: cannot L2-normalise"):
        load_embeddings(write_embeddings(tmp_path / "z.parquet", np.arange(50), x),
                        normalize=True)


def test_duplicate_ids(tmp_path, x):
    ids = np.arange(50)
    ids[30] = 4
    path = write_embeddings(tmp_path / "e.parquet", ids, x)
    with pytest.raises(InputError, match=r"row 30: duplicate id 4, first seen at row 4"):
        load_embeddings(path)


def test_wrong_dtype(tmp_path):
    pq.write_table(pa.table({"id": [0, 1], "embedding": [["a", "b"], ["c", "d"]]}),
                   tmp_path / "e.parquet")
    with pytest.raises(InputError, match=r"values are not floats \(expected float32, got string"):
        load_embeddings(tmp_path / "e.parquet")


def test_not_a_list_column(tmp_path):
    pq.write_table(pa.table({"id": [0, 1], "embedding": [0.5, 0.25]}), tmp_path / "e.parquet")
    with pytest.raises(InputError, match="not a list of floats"):
        load_embeddings(tmp_path / "e.parquet")


def test_null_embedding(tmp_path):
    pq.write_table(pa.table({"id": [0, 1, 2], "embedding": [[1.0], None, [2.0]]}),
                   tmp_path / "e.parquet")
    with pytest.raises(InputError, match="row 1: null embedding"):
        load_embeddings(tmp_path / "e.parquet")


def test_not_parquet(tmp_path):
    (tmp_path / "e.parquet").write_text("hello")
    with pytest.raises(InputError, match="not a readable Parquet file"):
        load_embeddings(tmp_path / "e.parquet")


def test_npy_needs_ids_and_alignment(tmp_path, x):
    np.save(tmp_path / "e.npy", x)
    with pytest.raises(InputError, match=r"need an aligned id file \(--ids-path"):
        load_embeddings(tmp_path / "e.npy")
    np.save(tmp_path / "ids.npy", np.arange(49))
    with pytest.raises(InputError, match=r"not aligned .*expected 50 ids, got 49"):
        load_embeddings(EmbeddingSource(path=str(tmp_path / "e.npy"),
                                        ids_path=str(tmp_path / "ids.npy")))


def test_zero_vector_cannot_be_normalised(x):
    x = x.copy()
    x[5] = 0
    with pytest.raises(InputError, match="row 5: cannot L2-normalise"):
        Embeddings.from_arrays(np.arange(50), x, normalize=True)


def test_too_few_rows_for_a_batch(x):
    emb = Embeddings.from_arrays(np.arange(50), x)
    config = MiningConfig(batch_size=64, cluster_size=16, p=3, m=20)
    with pytest.raises(InputError, match=r"expected >= batch_size = 64 rows, got 50"):
        config.check_fits(emb.n_rows, emb.source)


def test_fingerprint_tracks_content(x):
    a = Embeddings.from_arrays(np.arange(50), x)
    b = Embeddings.from_arrays(np.arange(50), x.copy())
    y = x.copy()
    y[0, 0] += 1e-3
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != Embeddings.from_arrays(np.arange(50), y).fingerprint()
    assert a.fingerprint() != Embeddings.from_arrays(np.arange(1, 51), x).fingerprint()
