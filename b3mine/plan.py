"""The batch-plan format: a directory with a manifest and Parquet tables, written atomically.

Layout of ``<root>/<plan_id>/``::

    manifest.json      plan id, config, dataset fingerprint, counts, stats, versions, file hashes
    clusters.parquet   cluster:int32, row:int64, id, padded:bool         (sorted by cluster)
    batches.parquet    epoch:int32, batch:int32, position:int32, row:int64, id, cluster:int32,
                       padded:bool     (row groups of counts.batches_per_row_group whole batches,
                                        none spanning two epochs)
    negatives.parquet  row:int64, id, negative_rows:list<int64>, negative_ids:list<id>
                                                                         (only with extra negatives)

A mixture plan (`b3mine.mixture`) adds ``dataset:string`` to clusters.parquet and
batches.parquet (the dataset of each row; every cluster and every batch holds one dataset) and
``mixture`` to the manifest (the rule and the datasets, with the range of rows of each); plans
without them read as before.
    report.json/.png   quality report (hardness vs random batches), when computed

Every batch holds exactly ``batch_size`` rows; ``row`` indexes the embeddings/dataset the plan was
mined from and ``id`` is that row's id. ``padded`` marks rows added by a ``fill`` policy (they
repeat an example that already appears elsewhere in the epoch). A plan is immutable: its id is a
content hash of the input data and the config, so the same inputs always name the same plan.

>>> plan = BatchPlan.open("plans/0123456789abcdef")      # doctest: +SKIP
>>> plan.batch_rows(epoch=0).shape                         # doctest: +SKIP
(97, 1024)
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from b3mine.config import MiningConfig
from b3mine.errors import PlanError
from b3mine.writers import LOCK_SUFFIX, remove_orphans, writer_lock

FORMAT_VERSION = 1
# Bumped whenever the same inputs and config can give a different plan (an algorithm change):
# 2 = canonical neighbour order (b3mine.neighbours.canonical_order).
RESULT_VERSION = 2
# Region-parallel plans only (``MiningConfig.region_size``), so global plan ids stay put:
# 2 = regions cut from the cell graph by KaMinPar (b3mine.regions).
REGIONS_VERSION = 2
# The distributions whose version can change a plan, per setting that uses them. numpy draws
# every random choice (its Generator streams may change between releases).
RESULT_LIBRARIES: dict[str, tuple[str, ...]] = {
    "kaminpar": ("kaminpar",),
    "metis": ("pymetis",),
    "louvain": ("networkx", "python-louvain"),
    "igraph-louvain": ("igraph",),
    "leiden": ("igraph", "leidenalg"),
    "ivf": ("faiss-cpu", "faiss-gpu"),  # approximate indexes: their candidates are FAISS's
    "hnsw": ("faiss-cpu", "faiss-gpu"),
}
MANIFEST = "manifest.json"
CLUSTERS = "clusters.parquet"
BATCHES = "batches.parquet"
NEGATIVES = "negatives.parquet"


def result_versions(config: MiningConfig) -> dict[str, str]:
    """Versions of what can change this config's plan: the result version, numpy (major.minor)
    and the clustering/index libraries the config uses. Exact indexes are left out: their
    canonical order does not depend on the library that searched."""
    from importlib import metadata

    out = {"b3mine-result": str(RESULT_VERSION),
           "numpy": ".".join(np.__version__.split(".")[:2])}
    libraries = (RESULT_LIBRARIES.get(config.algorithm, ())
                 + RESULT_LIBRARIES.get(config.neighbours.index, ()))
    if config.region_size is not None:
        out["b3mine-regions"] = str(REGIONS_VERSION)
        libraries += RESULT_LIBRARIES["kaminpar"]  # it cuts the regions, whatever the backend
    for name in dict.fromkeys(libraries):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def plan_id_for(dataset_fingerprint: str, config: MiningConfig) -> str:
    """Content hash of the inputs, the config and `result_versions`: the same id always names
    the same plan (same data, config and result-relevant libraries)."""
    h = hashlib.sha256()
    h.update(f"b3mine-plan-v{FORMAT_VERSION}\0{dataset_fingerprint}\0".encode())
    h.update(config.result_json().encode())
    h.update(json.dumps(result_versions(config), sort_keys=True).encode())
    return h.hexdigest()[:20]


class DatasetInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    fingerprint: str
    n_rows: int
    dim: int
    paired: bool
    id_type: str  # "int64" or "string"
    source: str | None = None


class PlanCounts(BaseModel):
    model_config = ConfigDict(frozen=True)

    n_clusters: int
    cluster_size: int
    batch_size: int
    epochs: int
    batches_per_epoch: int
    examples_per_epoch: list[int]  # distinct, non-padded rows of each epoch
    remainder_dropped: int  # rows in no cluster (remainder policy "drop")
    remainder_padded: int  # padding rows added to complete the last cluster
    last_batch_padded: int  # padding rows per epoch added to complete the last batch
    n_edges: int = 0
    extra_negatives: int = 0  # per example; 0 when the plan has no negatives table
    # batches per row group of batches.parquet (no group spans two epochs); None: one group
    # per epoch (plans written before groups)
    batches_per_row_group: int | None = None


class MixturePart(BaseModel):
    """One dataset of a mixture plan: its rows are ``[offset, offset + n_rows)``."""

    model_config = ConfigDict(frozen=True)

    name: str
    offset: int
    n_rows: int
    fingerprint: str
    source: str | None = None
    weight: float | None = None
    p: int
    m: int
    batches_per_epoch: int  # this dataset's batches in every epoch of the plan


class MixtureInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    rule: str  # "size" or "weights" (b3mine.mixture)
    datasets: list[MixturePart]

    def dataset_of_rows(self, rows: np.ndarray) -> np.ndarray:
        """Index (into ``datasets``) of the dataset each row belongs to."""
        starts = np.array([d.offset for d in self.datasets], dtype=np.int64)
        return np.searchsorted(starts, np.asarray(rows, dtype=np.int64), side="right") - 1


class PlanLineage(BaseModel):
    """Where a plan's embeddings came from: the teacher, or a student during training.

    Not part of the plan id: the id hashes what decides the plan's content (embeddings and
    config), and lineage changes neither. The first writer of a plan id records its lineage;
    a student plan's embeddings are unique to its run and step, so in practice that is the
    only writer. ``run`` names the training run (the trainer uses its config digest), ``parent``
    the plan that was being trained on when the refresh started.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["teacher", "student"] = "student"
    run: str | None = Field(None, max_length=128)
    step: int = Field(0, ge=0, description="training step whose student embedded the pairs")
    parent: str | None = Field(None, max_length=128, description="plan id this one refreshes")
    teacher_weight: float = Field(0.0, ge=0, le=1, description="share of the teacher's cosine "
                                  "in the similarity the plan was mined on")


class PlanManifest(BaseModel):
    model_config = ConfigDict(frozen=True)

    format_version: int = FORMAT_VERSION
    plan_id: str
    created_at: str
    config: MiningConfig
    dataset: DatasetInfo
    counts: PlanCounts
    stats: dict[str, Any] = {}
    versions: dict[str, str] = {}
    files: dict[str, str] = {}  # file name -> sha256
    file_sizes: dict[str, int] = {}  # file name -> bytes (object-store readers check these)
    mixture: MixtureInfo | None = None  # only in mixture plans
    lineage: PlanLineage | None = None  # None: mined outside a training run


@dataclass(frozen=True)
class PlanTables:
    """A plan in memory, before it is written.

    clusters: (C, K) int64 rows; cluster_padded: (C, K) bool.
    batches: (E, nb, B) int64 rows; batch_cluster: (E, nb, B) int32; batch_padded: (E, nb, B) bool.
    negatives: (N, k) int64 rows per dataset row (-1 = none), or None.
    dataset_names: a mixture's dataset of each row (N,) as names, or None (one dataset).
    """

    ids: np.ndarray
    clusters: np.ndarray
    cluster_padded: np.ndarray
    batches: np.ndarray
    batch_cluster: np.ndarray
    batch_padded: np.ndarray
    negatives: np.ndarray | None = None
    extra_files: dict[str, bytes] = field(default_factory=dict)
    dataset_names: np.ndarray | None = None


def check_output_dir(root: str | Path) -> Path:
    """Create ``root`` if needed and prove it takes a plan (a probe directory is made and
    removed), so an unwritable or clashing output fails in one line before any mining."""
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".probe-{uuid.uuid4().hex[:8]}"
        probe.mkdir()
        probe.rmdir()
    except FileExistsError as exc:
        raise PlanError(f"output directory {root}: a file is in the way ({exc.filename})") \
            from exc
    except NotADirectoryError as exc:
        raise PlanError(f"output directory {root}: a parent is a file, not a directory") \
            from exc
    except OSError as exc:
        raise PlanError(f"output directory {root} is not writable: {exc.strerror or exc}") \
            from exc
    return root


def _ids_array(ids: np.ndarray) -> pa.Array:
    if ids.dtype.kind in "iu":
        return pa.array(ids.astype(np.int64, copy=False))
    return pa.array(ids.astype(str).tolist(), type=pa.string())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in ("b3mine", "numpy", "pyarrow", "faiss-cpu", "pymetis", "igraph", "scipy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


ROW_GROUP_ROWS = 65_536  # rows per Parquet row group, about (see group_size)


def group_size(unit: int) -> int:
    """Batches (or clusters) of ``unit`` rows per row group: groups of about ROW_GROUP_ROWS rows,
    so a writer holds one group, not an epoch, and a reader of one batch decodes one group."""
    return max(1, ROW_GROUP_ROWS // max(unit, 1))


class RowSet:
    """A set of rows in [0, n) as one bit per row: what the writer and the validator keep of a
    whole plan, so checking that a row is used once costs n/8 bytes, not n int64s."""

    def __init__(self, n_rows: int):
        self.bits = np.zeros((n_rows + 7) // 8, np.uint8)

    def contains(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, np.int64)
        return (self.bits[rows >> 3] & (1 << (rows & 7)).astype(np.uint8)) != 0

    def add(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, np.int64)
        np.bitwise_or.at(self.bits, rows >> 3, (1 << (rows & 7)).astype(np.uint8))

    def first_repeat(self, rows: np.ndarray) -> int | None:
        """Add ``rows``; the first row that was in the set already or repeats within ``rows``."""
        rows = np.asarray(rows, np.int64)
        uniq, counts = np.unique(rows, return_counts=True)
        again = uniq[(counts > 1) | self.contains(uniq)]
        self.add(uniq)
        return int(again[0]) if len(again) else None


def _with_dataset(table: pa.Table, tables: PlanTables, rows: np.ndarray) -> pa.Table:
    if tables.dataset_names is None:
        return table
    return table.append_column("dataset", pa.array(np.asarray(tables.dataset_names[rows])
                                                   .tolist(), pa.string()))


class _GroupWriter:
    """Appends tables to one Parquet file, one row group each. On a clean exit with nothing
    appended it writes ``empty`` (a valid table with no rows)."""

    def __init__(self, path: Path, empty: pa.Table):
        self.path, self.empty, self.writer = path, empty, None

    def __enter__(self) -> _GroupWriter:
        return self

    def write(self, table: pa.Table) -> None:
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, table.schema, write_page_checksum=True)
        self.writer.write_table(table, row_group_size=max(table.num_rows, 1))

    def __exit__(self, exc_type, *_: object) -> None:
        if self.writer is not None:
            self.writer.close()
        elif exc_type is None:
            pq.write_table(self.empty, self.path, write_page_checksum=True)


def _clusters_group(tables: PlanTables, c0: int, c1: int) -> pa.Table:
    k = tables.clusters.shape[1]
    rows = np.asarray(tables.clusters[c0:c1], np.int64).reshape(-1)
    return _with_dataset(pa.table({
        "cluster": pa.array(np.repeat(np.arange(c0, c1, dtype=np.int32), k)),
        "row": pa.array(rows),
        "id": _ids_array(tables.ids[rows]),
        "padded": pa.array(np.asarray(tables.cluster_padded[c0:c1]).reshape(-1)),
    }), tables, rows)


def _batches_group(tables: PlanTables, e: int, b0: int, b1: int) -> pa.Table:
    batch_size = tables.batches.shape[2]
    rows = np.asarray(tables.batches[e, b0:b1], np.int64).reshape(-1)
    return _with_dataset(pa.table({
        "epoch": pa.array(np.full(len(rows), e, dtype=np.int32)),
        "batch": pa.array(np.repeat(np.arange(b0, b1, dtype=np.int32), batch_size)),
        "position": pa.array(np.tile(np.arange(batch_size, dtype=np.int32), b1 - b0)),
        "row": pa.array(rows),
        "id": _ids_array(tables.ids[rows]),
        "cluster": pa.array(np.asarray(tables.batch_cluster[e, b0:b1], np.int32).reshape(-1)),
        "padded": pa.array(np.asarray(tables.batch_padded[e, b0:b1]).reshape(-1)),
    }), tables, rows)


def _negatives_group(tables: PlanTables, rows: np.ndarray) -> pa.Table:
    chosen = np.asarray(tables.negatives[rows])
    valid = chosen >= 0
    offsets = np.concatenate([[0], np.cumsum(valid.sum(axis=1))]).astype(np.int32)
    flat = chosen[valid].astype(np.int64)
    return pa.table({
        "row": pa.array(rows),
        "id": _ids_array(tables.ids[rows]),
        "negative_rows": pa.ListArray.from_arrays(offsets, pa.array(flat, pa.int64())),
        # ids too, so a trainer matching the plan to its dataset by id can use them
        "negative_ids": pa.ListArray.from_arrays(offsets, _ids_array(tables.ids[flat])),
    })


def _write_tables(tmp: Path, tables: PlanTables) -> None:
    """Write the tables one row group at a time: the arrays may be memory-mapped, and no more
    than a group of any table is built in memory (a region-parallel plan of any N)."""
    n_clusters, k = tables.clusters.shape
    in_clusters = RowSet(len(tables.ids))  # each row of a cluster gets a negatives entry
    with _GroupWriter(tmp / CLUSTERS, _clusters_group(tables, 0, 0)) as out:
        step = group_size(k)
        for c0 in range(0, n_clusters, step):
            group = _clusters_group(tables, c0, min(c0 + step, n_clusters))
            in_clusters.add(group.column("row").to_numpy())
            out.write(group)
    epochs, n_batches, batch_size = tables.batches.shape
    with _GroupWriter(tmp / BATCHES, _batches_group(tables, 0, 0, 0)) as out:
        step = group_size(batch_size)
        for e in range(epochs):  # whole batches per group; no group spans two epochs
            for b0 in range(0, n_batches, step):
                out.write(_batches_group(tables, e, b0, min(b0 + step, n_batches)))
    if tables.negatives is not None:
        no_rows = np.zeros(0, np.int64)
        with _GroupWriter(tmp / NEGATIVES, _negatives_group(tables, no_rows)) as out:
            for a in range(0, len(tables.ids), ROW_GROUP_ROWS):  # ascending rows: it is searched
                span = np.arange(a, min(a + ROW_GROUP_ROWS, len(tables.ids)), dtype=np.int64)
                rows = span[in_clusters.contains(span)]
                if len(rows):
                    out.write(_negatives_group(tables, rows))
    for name, data in tables.extra_files.items():
        (tmp / name).write_bytes(data)


def write_plan(
    root: str | Path,
    *,
    config: MiningConfig,
    dataset: DatasetInfo,
    counts: PlanCounts,
    tables: PlanTables,
    stats: dict[str, Any] | None = None,
    plan_id: str | None = None,
    mixture: MixtureInfo | None = None,
    lineage: PlanLineage | None = None,
) -> BatchPlan:
    """Write a plan under ``root/<plan_id>`` atomically (temp dir + rename) and return it.

    If the plan already exists (same data and config) the existing one is returned untouched.
    A crash at any point leaves at most a hidden ``.tmp-*`` directory, never a half plan; the
    next write under ``root`` removes it (``b3mine.writers``: only when its writer is dead).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    remove_orphans(root, ".tmp-")  # what killed writers left (never a live writer's)
    plan_id = plan_id or plan_id_for(dataset.fingerprint, config)
    final = root / plan_id
    if (final / MANIFEST).exists():
        return BatchPlan.open(final)
    tmp = root / f".tmp-{plan_id}-{uuid.uuid4().hex[:8]}"
    with writer_lock(tmp.with_name(tmp.name + LOCK_SUFFIX)):
        tmp.mkdir()
        counts = counts.model_copy(update={
            "batches_per_row_group": group_size(counts.batch_size)})
        try:
            _write_tables(tmp, tables)
            written = [p for p in sorted(tmp.iterdir()) if p.is_file()]
            files = {p.name: sha256_file(p) for p in written}
            manifest = PlanManifest(
                plan_id=plan_id,
                created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                config=config,
                dataset=dataset,
                counts=counts,
                stats=stats or {},
                versions=library_versions(),
                files=files,
                file_sizes={p.name: p.stat().st_size for p in written},
                mixture=mixture,
                lineage=lineage,
            )
            _atomic_write_text(tmp / MANIFEST, manifest.model_dump_json(indent=2))
            # what a reader will do, before anyone can see it: a plan that cannot be opened
            # and validated (a manifest that does not round-trip, a broken table) is never
            # published
            BatchPlan.open(tmp).validate(check_hashes=False)
            _fsync_dir(tmp)
            try:
                os.rename(tmp, final)
            except OSError:
                if (final / MANIFEST).exists():  # a concurrent writer won the race: same content
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    raise
            _fsync_dir(root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return BatchPlan.open(final)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PlanShape:
    """Shape of a plan read off ``self.manifest``: shared by `BatchPlan` and every plan source
    of the trainers (local directory or REST client), so each answers the same way."""

    manifest: PlanManifest

    @property
    def plan_id(self) -> str:
        return self.manifest.plan_id

    @property
    def config(self) -> MiningConfig:
        return self.manifest.config

    @property
    def epochs(self) -> int:
        return self.manifest.counts.epochs

    @property
    def batch_size(self) -> int:
        return self.manifest.counts.batch_size

    @property
    def batches_per_epoch(self) -> int:
        return self.manifest.counts.batches_per_epoch

    @property
    def n_rows(self) -> int:
        """Rows of the dataset the plan was mined from (``row`` values lie in [0, n_rows))."""
        return self.manifest.dataset.n_rows

    @property
    def has_negatives(self) -> bool:
        return self.manifest.counts.extra_negatives > 0


@dataclass(frozen=True)
class BatchPlan(PlanShape):
    """A plan on disk, read lazily through memory-mapped Parquet."""

    path: Path
    manifest: PlanManifest

    def __repr__(self) -> str:  # the manifest (~2 KB) is not repeated: the path names the plan
        c = self.manifest.counts
        return (f"BatchPlan({str(self.path)!r}, rows={self.n_rows}, epochs={c.epochs}, "
                f"batches_per_epoch={c.batches_per_epoch}, batch_size={c.batch_size})")

    @classmethod
    def open(cls, path: str | Path, *, validate: bool = False) -> BatchPlan:
        """Open a plan directory, or (an fsspec URL) a verified local copy of a published plan
        (``b3mine.storage.download_plan``)."""
        from b3mine import storage

        if storage.is_url(path):
            path = storage.download_plan(str(path))
        path = storage.local_path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise PlanError(f"{path}: not a plan directory (no {MANIFEST})")
        try:
            manifest = PlanManifest.model_validate_json(manifest_path.read_text())
        except ValueError as exc:
            raise PlanError(f"{manifest_path}: invalid manifest: {exc}") from exc
        if manifest.format_version != FORMAT_VERSION:
            raise PlanError(
                f"{manifest_path}: format_version {manifest.format_version} is not supported "
                f"(expected {FORMAT_VERSION})"
            )
        for name in manifest.files:
            if not (path / name).is_file():
                raise PlanError(f"{path}: file {name} listed in the manifest is missing")
        plan = cls(path=path, manifest=manifest)
        if validate:
            plan.validate()
        return plan

    # -- reading -----------------------------------------------------------------------------
    @cached_property
    def _batches_file(self) -> pq.ParquetFile:
        return pq.ParquetFile(self.path / BATCHES, memory_map=True,
                              page_checksum_verification=True)

    def _check_epoch(self, epoch: int) -> None:
        if not 0 <= epoch < self.epochs:
            raise PlanError(f"plan {self.plan_id}: epoch {epoch} out of range [0, {self.epochs})")

    def _check_batch(self, batch: int) -> None:
        if not 0 <= batch < self.batches_per_epoch:
            raise PlanError(
                f"plan {self.plan_id}: batch {batch} out of range [0, {self.batches_per_epoch})"
            )

    def _epoch_groups(self, epoch: int) -> range:
        """The row groups of ``epoch`` in batches.parquet."""
        c = self.manifest.counts
        per_group = c.batches_per_row_group or max(c.batches_per_epoch, 1)
        per_epoch = -(-c.batches_per_epoch // per_group)
        return range(epoch * per_epoch, (epoch + 1) * per_epoch)

    def epoch_table(self, epoch: int, columns: list[str] | None = None) -> pa.Table:
        """All batches of one epoch, in order (epoch, batch, position, row, id, cluster, padded)."""
        self._check_epoch(epoch)
        if self.batches_per_epoch == 0:
            empty = self._batches_file.schema_arrow.empty_table()
            return empty.select(columns) if columns else empty
        return self._batches_file.read_row_groups(list(self._epoch_groups(epoch)),
                                                  columns=columns)

    def batch_table(self, epoch: int, batch: int) -> pa.Table:
        """One batch: reads its row group only, not the epoch."""
        self._check_epoch(epoch)
        self._check_batch(batch)
        per_group = self.manifest.counts.batches_per_row_group or self.batches_per_epoch
        group, at = divmod(batch, per_group)
        table = self._batches_file.read_row_group(self._epoch_groups(epoch)[group])
        return table.slice(at * self.batch_size, self.batch_size)

    def batch_rows(self, epoch: int) -> np.ndarray:
        """Dataset rows of an epoch as a (batches_per_epoch, batch_size) int64 array."""
        rows = self.epoch_table(epoch, columns=["row"]).column("row").to_numpy()
        return rows.reshape(self.batches_per_epoch, self.batch_size)

    def clusters_table(self) -> pa.Table:
        return pq.read_table(self.path / CLUSTERS, memory_map=True,
                             page_checksum_verification=True)

    @cached_property
    def _negatives(self) -> pa.Table | None:
        if not self.has_negatives:
            return None
        return pq.read_table(self.path / NEGATIVES, memory_map=True,
                             page_checksum_verification=True)

    def negatives_table(self) -> pa.Table | None:
        return self._negatives

    def negatives_take(self, rows: np.ndarray) -> dict[str, pa.Array] | None:
        """``negative_rows`` and ``negative_ids`` list arrays aligned with ``rows`` (null where a
        row has no entry); None when the plan has no negatives. The one lookup that the
        service's epoch files and the trainers' sources share."""
        table = self.negatives_table()
        if table is None:
            return None
        neg_rows = table.column("row").to_numpy()  # ascending: written from np.unique
        rows = np.asarray(rows, dtype=np.int64)
        pos = np.searchsorted(neg_rows, rows).clip(0, max(len(neg_rows) - 1, 0))
        found = neg_rows[pos] == rows if len(neg_rows) else np.zeros(len(rows), bool)
        index = pa.array(pos, type=pa.int64(), mask=~found)
        return {name: table.column(name).combine_chunks().take(index)
                for name in ("negative_rows", "negative_ids")}

    def negatives_for(self, rows: np.ndarray) -> np.ndarray:
        """Extra hard-negative rows of each of ``rows``: an int64 array (len(rows), k), k the
        plan's negatives per example, -1 where a row has fewer (shape (len(rows), 0) when the
        plan has none)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.full((len(rows), self.manifest.counts.extra_negatives), -1, np.int64)
        taken = self.negatives_take(rows)
        if taken is None:
            return out
        lists = taken["negative_rows"]
        lengths = lists.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
        starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
        flat = lists.flatten().to_numpy(zero_copy_only=False)
        out[np.repeat(np.arange(len(rows)), lengths), np.arange(len(flat)) - starts] = flat
        return out

    def report(self) -> dict[str, Any] | None:
        path = self.path / "report.json"
        return json.loads(path.read_text()) if path.is_file() else None

    # -- invariants --------------------------------------------------------------------------
    def validate(self, *, check_hashes: bool = True) -> None:
        """Raise PlanError unless every invariant of the format holds.

        The tables are read one row group at a time and what is kept of the whole plan is a
        bit per row (`RowSet`) and a sample of each epoch, so validating any plan takes about
        a row group of memory plus N/8 bytes."""
        m, c = self.manifest, self.manifest.counts
        if check_hashes:
            for name, digest in m.files.items():
                if sha256_file(self.path / name) != digest:
                    raise PlanError(f"{self.path / name}: content does not match the manifest hash")
        groups = self._batches_file.metadata.num_row_groups
        expect = c.epochs * len(self._epoch_groups(0)) if c.batches_per_epoch else 1
        if groups != expect:
            raise PlanError(f"{BATCHES}: {groups} row groups, expected {expect} "
                            f"({len(self._epoch_groups(0))} per epoch)")
        samples = [self._validate_epoch(e) for e in range(c.epochs)]
        if m.mixture is not None:  # (mixtures are mined in one process: read whole)
            clusters = self.clusters_table()
            self._validate_mixture(clusters, clusters.column("row").to_numpy())
        self._validate_clusters(samples)

    def _validate_clusters(self, samples: list[tuple[str, dict[str, np.ndarray]]]) -> None:
        """clusters.parquet: entry i belongs to cluster i // K, rows in range, each real row in
        one cluster; and each sampled batch entry is a real member of its cluster, same id."""
        m, c = self.manifest, self.manifest.counts
        k, n = c.cluster_size, m.dataset.n_rows
        sample = {name: np.concatenate([s[name] for _, s in samples]) if samples else
                  np.zeros(0, np.int64) for name in ("row", "cluster", "id")}
        where_of = np.concatenate([np.full(len(s["row"]), i) for i, (_, s) in
                                   enumerate(samples)]).astype(np.int64) if samples else \
            np.zeros(0, np.int64)
        order = np.argsort(sample["cluster"], kind="stable")
        found = np.zeros(len(order), bool)
        real_rows = RowSet(n)
        file = pq.ParquetFile(self.path / CLUSTERS, memory_map=True,
                              page_checksum_verification=True)
        start = padded = 0
        for g in range(file.metadata.num_row_groups):
            t = file.read_row_group(g, columns=["cluster", "row", "id", "padded"])
            cid, crow = t.column("cluster").to_numpy(), t.column("row").to_numpy()
            cpad = t.column("padded").to_numpy(zero_copy_only=False)
            at = np.arange(start, start + len(crow))
            if (cid != at // max(k, 1)).any():
                raise PlanError(f"{CLUSTERS}: clusters are not {k} rows each, in order")
            if len(crow) and (crow.min() < 0 or crow.max() >= n):
                raise PlanError(f"{CLUSTERS}: row outside [0, {n})")
            if real_rows.first_repeat(crow[~cpad]) is not None:
                raise PlanError(f"{CLUSTERS}: a non-padded row appears in two clusters")
            padded += int(cpad.sum())
            # the sampled batch entries whose cluster starts in this group (writers never
            # split a cluster between groups; one that did fails the membership check)
            lo, hi = np.searchsorted(sample["cluster"][order],
                                     [start // max(k, 1), -(-(start + len(crow)) // max(k, 1))])
            pick = order[lo:hi]
            if len(pick):
                slots = (sample["cluster"][pick, None] * k + np.arange(k)) - start
                inside = (slots >= 0) & (slots < len(crow))
                slots = np.where(inside, slots, 0)
                ids = t.column("id").to_numpy(zero_copy_only=False)
                hit = inside & ~cpad[slots] & (crow[slots] == sample["row"][pick, None])
                found[pick] |= (hit & (ids[slots] == sample["id"][pick, None])).any(axis=1)
            start += len(crow)
        if start != c.n_clusters * k:
            raise PlanError(f"{CLUSTERS}: {start} rows, expected n_clusters*cluster_size = "
                            f"{c.n_clusters * k}")
        if padded != c.remainder_padded:
            raise PlanError(f"{CLUSTERS}: {padded} padded rows, manifest says "
                            f"{c.remainder_padded}")
        if (~found).any():
            bad = int(np.flatnonzero(~found)[0])
            row, where = int(sample["row"][bad]), samples[where_of[bad]][0]
            if not real_rows.contains(np.array([row]))[0]:
                raise PlanError(f"{where}: row {row} is in no cluster")
            raise PlanError(f"{where}: row {row} has a wrong id or cluster")

    def _validate_mixture(self, clusters: pa.Table, crow: np.ndarray) -> None:
        """Every row's dataset is the one its row range says; clusters and batches are single-
        dataset; each epoch holds each dataset's ``batches_per_epoch`` batches."""
        mix = self.manifest.mixture
        assert mix is not None
        names = np.array([d.name for d in mix.datasets])
        ends = [d.offset + d.n_rows for d in mix.datasets]
        if [d.offset for d in mix.datasets[1:]] != ends[:-1] or (
                ends and ends[-1] != self.manifest.dataset.n_rows):
            raise PlanError(f"{MANIFEST}: mixture row ranges do not tile the dataset")
        for name, rows, table in [(CLUSTERS, crow, clusters)] + [
                (f"{BATCHES} epoch {e}", self.epoch_table(e).column("row").to_numpy(),
                 self.epoch_table(e)) for e in range(self.epochs)]:
            if "dataset" not in table.column_names:
                raise PlanError(f"{name}: a mixture plan needs a dataset column")
            got = np.asarray(table.column("dataset").to_numpy(zero_copy_only=False))
            if len(rows) and (got != names[mix.dataset_of_rows(rows)]).any():
                raise PlanError(f"{name}: a row's dataset does not match its row range")
        k = self.manifest.counts.cluster_size
        if len(crow) and (mix.dataset_of_rows(crow).reshape(-1, k)
                          != mix.dataset_of_rows(crow[::k])[:, None]).any():
            raise PlanError(f"{CLUSTERS}: a cluster mixes datasets")
        b = self.batch_size
        for e in range(self.epochs):
            which = mix.dataset_of_rows(self.batch_rows(e).reshape(-1)).reshape(-1, b)
            if len(which) and (which != which[:, :1]).any():
                raise PlanError(f"{BATCHES} epoch {e}: a batch mixes datasets")
            counts = np.bincount(which[:, 0], minlength=len(names)) if len(which) else \
                np.zeros(len(names), int)
            if counts.tolist() != [d.batches_per_epoch for d in mix.datasets]:
                raise PlanError(f"{BATCHES} epoch {e}: batches per dataset {counts.tolist()}, "
                                f"manifest says {[d.batches_per_epoch for d in mix.datasets]}")

    def _validate_epoch(self, e: int) -> tuple[str, dict[str, np.ndarray]]:
        """One epoch, group by group; returns a sample of its real entries (row, cluster, id)
        for `_validate_clusters` to look up."""
        c = self.manifest.counts
        n_rows, b = self.manifest.dataset.n_rows, c.batch_size
        where = f"{BATCHES} epoch {e}"
        n = c.batches_per_epoch * b
        stride = max(1, n // 4096)
        seen = RowSet(n_rows)
        start = real = 0
        sample: dict[str, list[np.ndarray]] = {"row": [], "cluster": [], "id": []}
        for g in (self._epoch_groups(e) if n else ()):
            t = self._batches_file.read_row_group(g)
            cols = {name: t.column(name).to_numpy(zero_copy_only=False)
                    for name in ("epoch", "batch", "position", "row", "cluster", "padded")}
            at = np.arange(start, start + t.num_rows)
            if (cols["epoch"] != e).any():
                raise PlanError(f"{where}: holds rows of another epoch")
            if t.num_rows % max(b, 1) or (cols["batch"] != at // b).any() or (
                    cols["position"] != at % b).any():
                raise PlanError(f"{where}: batches/positions are not complete and in order")
            rows, keep = cols["row"], ~cols["padded"]
            outside = np.flatnonzero((rows < 0) | (rows >= n_rows))
            if len(outside):
                raise PlanError(f"{where}: row {int(rows[outside[0]])} is in no cluster (rows "
                                f"lie in [0, {n_rows}))")
            dup = seen.first_repeat(rows[keep])
            if dup is not None:
                raise PlanError(f"{where}: row {dup} appears twice without being marked padded")
            real += int(keep.sum())
            picked = np.flatnonzero(keep & (at % stride == 0))
            sample["row"].append(rows[picked])
            sample["cluster"].append(cols["cluster"][picked].astype(np.int64))
            sample["id"].append(t.column("id").take(pa.array(picked)).to_numpy(
                zero_copy_only=False))
            start += t.num_rows
        if start != n:
            raise PlanError(f"{where}: {start} rows, expected {n}")
        if real != c.examples_per_epoch[e]:
            raise PlanError(
                f"{where}: {real} distinct examples, manifest says {c.examples_per_epoch[e]}")
        return where, {name: np.concatenate(v) if v else np.zeros(0, np.int64)
                       for name, v in sample.items()}


def list_plans(root: str | Path) -> list[BatchPlan]:
    """Every complete plan under ``root`` (temp directories of unfinished writes are skipped)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return [
        BatchPlan.open(p)
        for p in sorted(root.iterdir())
        if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).is_file()
    ]
