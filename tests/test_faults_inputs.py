"""Fault and abuse cases of the core (issue 15): bad configs, bad numbers, bad files, bad output
directories, corrupt Parquet, half-written plans. Each must end in one named line (InputError,
PlanError, pydantic's ValidationError) and leave nothing half-written behind."""
from __future__ import annotations

import math
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from b3mine import plan as plan_module
from b3mine.config import MiningConfig, NegativesConfig, NeighbourConfig
from b3mine.embeddings import Embeddings, load_embeddings
from b3mine.errors import B3MineError, InputError, PlanError
from b3mine.mining import mine
from b3mine.plan import BatchPlan
from b3mine.writers import writer_lock

from tests.conftest import clustered_vectors, write_embeddings

SMALL = dict(batch_size=64, cluster_size=16, p=2, m=8)


@pytest.mark.parametrize("make", [
    lambda: MiningConfig(resolution=math.inf),
    lambda: MiningConfig(resolution=float("nan")),
    lambda: MiningConfig(negatives=NegativesConfig(positive_filter=math.inf)),
    lambda: MiningConfig.model_validate_json('{"resolution": Infinity}'),
    lambda: MiningConfig.model_validate_json('{"negatives": {"positive_filter": NaN}}'),
], ids=["inf", "nan", "nested-inf", "json-Infinity", "json-NaN"])
def test_non_finite_numbers_are_refused(make):
    with pytest.raises(ValidationError, match="finite"):
        make()


def test_non_finite_train_config_is_refused():
    pytest.importorskip("torch")
    from trainers.train.config import TrainConfig

    floats = [name for name, f in TrainConfig.model_fields.items() if f.annotation is float]
    assert floats
    with pytest.raises(ValidationError, match="finite"):
        TrainConfig(**{floats[0]: math.inf})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    x = clustered_vectors(300, 16, 6, seed=4)
    return x, write_embeddings(tmp_path_factory.mktemp("c") / "c.parquet", np.arange(300), x)


def test_mine_accepts_a_config_dict(corpus, tmp_path):
    _, path = corpus
    a = mine(path, SMALL, tmp_path, report=False)
    assert a.manifest.config == MiningConfig(**SMALL)


def test_a_window_that_cannot_fit_is_refused(corpus, tmp_path):
    _, path = corpus
    with pytest.raises(InputError, match=r"rank window.*p \+ m <= 300 rows, got p=300, m=8"):
        mine(path, {**SMALL, "p": 300}, tmp_path)
    with pytest.raises(InputError, match="p=295, m=8"):
        mine(path, {**SMALL, "p": 295}, tmp_path)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("scale", [1e30, 1e-30])
def test_extreme_scales_normalise_safely(corpus, tmp_path, scale):
    x, _ = corpus
    emb = Embeddings.from_arrays(np.arange(300), x * np.float32(scale), normalize=True)
    assert np.isfinite(emb.queries).all()
    np.testing.assert_allclose(np.linalg.norm(emb.queries, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(emb.queries, x, atol=1e-5)
    plan = mine(Embeddings.from_arrays(np.arange(300), x * np.float32(scale)), SMALL, tmp_path)
    assert plan.manifest.stats["quality"]["plan_mean"] > 0.1  # not the 0.0 of zeroed vectors


def test_zero_row_file_says_so(tmp_path):
    path = write_embeddings(tmp_path / "empty.parquet", np.arange(0),
                            np.zeros((0, 8), np.float32))
    with pytest.raises(InputError, match="no rows"):
        mine(path, SMALL, tmp_path / "plans")


def test_pickled_npy_and_ids_are_refused_without_unpickling(tmp_path):
    x = clustered_vectors(80, 8, 2)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "ids.npy", np.array([object()] * 80, dtype=object), allow_pickle=True)
    np.save(tmp_path / "bad.npy", np.array([x[0], "a"], dtype=object), allow_pickle=True)
    from b3mine.config import EmbeddingSource

    with pytest.raises(InputError, match=r"ids\.npy: a pickled \.npy"):
        load_embeddings(EmbeddingSource(path=str(tmp_path / "x.npy"),
                                        ids_path=str(tmp_path / "ids.npy")))
    with pytest.raises(InputError, match=r"bad\.npy: a pickled \.npy"):
        load_embeddings(EmbeddingSource(path=str(tmp_path / "bad.npy"),
                                        ids_path=str(tmp_path / "ids.txt")))


def test_ragged_lists_are_one_line():
    with pytest.raises(InputError, match="ragged"):
        Embeddings.from_arrays([1, 2], [[0.1, 0.2], [0.3]])


def test_output_directory_is_checked_first(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    # the embeddings do not even exist: the output check must come first
    with pytest.raises(PlanError, match="a parent is a file"):
        mine(tmp_path / "missing.parquet", SMALL, blocker / "plans")
    with pytest.raises(PlanError, match="file is in the way"):
        mine(tmp_path / "missing.parquet", SMALL, blocker)


def _flip_page_bytes(path, offset_fraction=0.5, n=64, column=0):
    data = bytearray(path.read_bytes())
    meta = pq.ParquetFile(path).metadata.row_group(0).column(column)
    first = meta.dictionary_page_offset or meta.data_page_offset  # the chunk's first page
    start = first + int(meta.total_compressed_size * offset_fraction)
    for i in range(start, min(start + n, first + meta.total_compressed_size)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_input_page_is_detected(corpus, tmp_path):
    x, _ = corpus
    path = tmp_path / "c.parquet"
    pq.write_table(pq.read_table(corpus[1]), path, write_page_checksum=True)
    _flip_page_bytes(path)
    with pytest.raises(InputError, match="c.parquet.*(corrupt|CRC|checksum)"):
        load_embeddings(path)


def test_plan_pages_carry_checksums_and_are_verified(corpus, tmp_path):
    plan = mine(corpus[1], SMALL, tmp_path, report=False)
    meta = pq.ParquetFile(plan.path / "batches.parquet").metadata
    assert meta.num_row_groups >= 1
    copy = tmp_path / "copy"
    shutil.copytree(plan.path, copy)
    row = pq.ParquetFile(copy / "batches.parquet").schema_arrow.names.index("row")
    _flip_page_bytes(copy / "batches.parquet", offset_fraction=0.3, n=16, column=row)
    with pytest.raises((OSError, B3MineError)):  # never garbage rows
        BatchPlan.open(copy).batch_rows(0)


def test_a_plan_that_cannot_be_opened_is_never_published(corpus, tmp_path, monkeypatch):
    real = BatchPlan.validate

    def broken(self, **kw):
        raise PlanError("injected: invalid table")

    monkeypatch.setattr(BatchPlan, "validate", broken)
    with pytest.raises(PlanError, match="injected"):
        mine(corpus[1], SMALL, tmp_path, report=False)
    assert [p.name for p in tmp_path.iterdir()] == []  # no plan, no .tmp-*, no lock
    monkeypatch.setattr(BatchPlan, "validate", real)


def test_killed_writers_tmp_dirs_are_removed_live_ones_kept(corpus, tmp_path):
    dead = tmp_path / ".tmp-0123-dead"
    (dead / "x").mkdir(parents=True)
    (tmp_path / ".tmp-0123-dead2.lock").write_text("")  # lock of a dead writer, free
    (tmp_path / ".tmp-0123-dead2").mkdir()
    live = tmp_path / ".tmp-0123-live"
    with writer_lock(tmp_path / ".tmp-0123-live.lock"):
        live.mkdir()
        mine(corpus[1], SMALL, tmp_path, report=False)
        assert live.is_dir()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert not any(n.startswith(".tmp-0123-dead") for n in names), names
    assert ".tmp-0123-live" in names


def test_plan_id_names_one_result(monkeypatch):
    cfg = MiningConfig(**SMALL)
    same = cfg.model_copy(update={"neighbours": NeighbourConfig(block_size=7)})
    assert plan_module.plan_id_for("f", cfg) == plan_module.plan_id_for("f", same)
    other = cfg.model_copy(update={"neighbours": NeighbourConfig(index="hnsw")})
    assert plan_module.plan_id_for("f", cfg) != plan_module.plan_id_for("f", other)
