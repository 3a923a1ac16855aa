"""The batch-plan format: a directory with a manifest and Parquet tables, written atomically.

Layout of ``<root>/<plan_id>/``::

    manifest.json      plan id, config, dataset fingerprint, counts, stats, versions, file hashes
    clusters.parquet   cluster:int32, row:int64, id, padded:bool         (sorted by cluster)
    batches.parquet    epoch:int32, batch:int32, position:int32, row:int64, id, cluster:int32,
                       padded:bool                                       (one row group per epoch)
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
    for name in (RESULT_LIBRARIES.get(config.algorithm, ())
                 + RESULT_LIBRARIES.get(config.neighbours.index, ())):
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


def _with_dataset(table: pa.Table, tables: PlanTables, rows: np.ndarray) -> pa.Table:
    if tables.dataset_names is None:
        return table
    return table.append_column("dataset", pa.array(tables.dataset_names[rows].tolist(),
                                                   pa.string()))


def _write_tables(tmp: Path, tables: PlanTables) -> None:
    ids = tables.ids
    c_rows = tables.clusters.reshape(-1)
    n_clusters, k = tables.clusters.shape
    pq.write_table(
        _with_dataset(pa.table(
            {
                "cluster": pa.array(np.repeat(np.arange(n_clusters, dtype=np.int32), k)),
                "row": pa.array(c_rows.astype(np.int64)),
                "id": _ids_array(ids[c_rows]),
                "padded": pa.array(tables.cluster_padded.reshape(-1)),
            }
        ), tables, c_rows),
        tmp / CLUSTERS, write_page_checksum=True,
    )
    epochs, n_batches, batch_size = tables.batches.shape
    per_epoch = n_batches * batch_size
    schema = None
    writer = None
    try:
        for e in range(epochs):
            rows = tables.batches[e].reshape(-1).astype(np.int64)
            table = _with_dataset(pa.table(
                {
                    "epoch": pa.array(np.full(per_epoch, e, dtype=np.int32)),
                    "batch": pa.array(np.repeat(np.arange(n_batches, dtype=np.int32), batch_size)),
                    "position": pa.array(np.tile(np.arange(batch_size, dtype=np.int32), n_batches)),
                    "row": pa.array(rows),
                    "id": _ids_array(ids[rows]),
                    "cluster": pa.array(tables.batch_cluster[e].reshape(-1).astype(np.int32)),
                    "padded": pa.array(tables.batch_padded[e].reshape(-1)),
                }
            ), tables, rows)
            if writer is None:
                schema = table.schema
                writer = pq.ParquetWriter(tmp / BATCHES, schema, write_page_checksum=True)
            # One row group per epoch: readers fetch an epoch without touching the others.
            writer.write_table(table, row_group_size=max(per_epoch, 1))
        if writer is None:  # zero batches: still write a valid, empty table
            pq.write_table(
                pa.table({"epoch": pa.array([], pa.int32()), "batch": pa.array([], pa.int32()),
                          "position": pa.array([], pa.int32()), "row": pa.array([], pa.int64()),
                          "id": _ids_array(ids[:0]), "cluster": pa.array([], pa.int32()),
                          "padded": pa.array([], pa.bool_())}),
                tmp / BATCHES, write_page_checksum=True,
            )
    finally:
        if writer is not None:
            writer.close()
    if tables.negatives is not None:
        neg = tables.negatives
        rows = np.unique(c_rows)
        chosen = neg[rows]
        valid = chosen >= 0
        offsets = np.concatenate([[0], np.cumsum(valid.sum(axis=1))]).astype(np.int32)
        flat = chosen[valid]
        pq.write_table(
            pa.table(
                {
                    "row": pa.array(rows.astype(np.int64)),
                    "id": _ids_array(ids[rows]),
                    "negative_rows": pa.ListArray.from_arrays(offsets, pa.array(flat)),
                    # ids too, so a trainer matching the plan to its dataset by id can use them
                    "negative_ids": pa.ListArray.from_arrays(offsets, _ids_array(ids[flat])),
                }
            ),
            tmp / NEGATIVES, write_page_checksum=True,
        )
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

    def epoch_table(self, epoch: int) -> pa.Table:
        """All batches of one epoch, in order (epoch, batch, position, row, id, cluster, padded)."""
        self._check_epoch(epoch)
        if self.batches_per_epoch == 0:
            return self._batches_file.schema_arrow.empty_table()
        return self._batches_file.read_row_group(epoch)

    def batch_table(self, epoch: int, batch: int) -> pa.Table:
        self._check_batch(batch)
        return self.epoch_table(epoch).slice(batch * self.batch_size, self.batch_size)

    def batch_rows(self, epoch: int) -> np.ndarray:
        """Dataset rows of an epoch as a (batches_per_epoch, batch_size) int64 array."""
        rows = self.epoch_table(epoch).column("row").to_numpy()
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
        """Raise PlanError unless every invariant of the format holds."""
        m, c = self.manifest, self.manifest.counts
        if check_hashes:
            for name, digest in m.files.items():
                if sha256_file(self.path / name) != digest:
                    raise PlanError(f"{self.path / name}: content does not match the manifest hash")
        clusters = self.clusters_table()
        crow = clusters.column("row").to_numpy()
        cpad = clusters.column("padded").to_numpy(zero_copy_only=False)
        cid = clusters.column("cluster").to_numpy()
        if len(crow) != c.n_clusters * c.cluster_size:
            raise PlanError(
                f"{CLUSTERS}: {len(crow)} rows, expected n_clusters*cluster_size = "
                f"{c.n_clusters * c.cluster_size}"
            )
        if len(crow) and (np.bincount(cid, minlength=c.n_clusters) != c.cluster_size).any():
            raise PlanError(f"{CLUSTERS}: a cluster does not hold exactly {c.cluster_size} rows")
        if len(crow) and (crow.min() < 0 or crow.max() >= m.dataset.n_rows):
            raise PlanError(f"{CLUSTERS}: row outside [0, {m.dataset.n_rows})")
        real = crow[~cpad]
        if len(np.unique(real)) != len(real):
            raise PlanError(f"{CLUSTERS}: a non-padded row appears in two clusters")
        if int(cpad.sum()) != c.remainder_padded:
            raise PlanError(f"{CLUSTERS}: {int(cpad.sum())} padded rows, manifest says "
                            f"{c.remainder_padded}")
        if m.mixture is not None:
            self._validate_mixture(clusters, crow)
        # each real row's place in the clusters table, by row: sorted arrays, not dicts, so
        # validating a plan of N rows costs a few N-sized arrays of heap, not Python objects
        real_at = np.flatnonzero(~cpad)
        real_at = real_at[np.argsort(crow[real_at], kind="stable")]
        rows_index = (crow[real_at], real_at, clusters.column("id"), cid)
        if self._batches_file.metadata.num_row_groups != (c.epochs if c.batches_per_epoch else 1):
            raise PlanError(f"{BATCHES}: expected one row group per epoch ({c.epochs})")
        for e in range(c.epochs):
            self._validate_epoch(e, rows_index)

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

    def _validate_epoch(self, e: int, rows_index: tuple) -> None:
        c = self.manifest.counts
        t = self.epoch_table(e)
        n = c.batches_per_epoch * c.batch_size
        where = f"{BATCHES} epoch {e}"
        if t.num_rows != n:
            raise PlanError(f"{where}: {t.num_rows} rows, expected {n}")
        if n == 0:
            return
        cols = {name: t.column(name).to_numpy(zero_copy_only=False) for name in t.column_names}
        if (cols["epoch"] != e).any():
            raise PlanError(f"{where}: holds rows of another epoch")
        expect_batch = np.repeat(np.arange(c.batches_per_epoch), c.batch_size)
        expect_pos = np.tile(np.arange(c.batch_size), c.batches_per_epoch)
        if (cols["batch"] != expect_batch).any() or (cols["position"] != expect_pos).any():
            raise PlanError(f"{where}: batches/positions are not complete and in order")
        real = cols["row"][~cols["padded"]]
        if len(np.unique(real)) != len(real):
            dup = int(real[np.argmax(np.bincount(real))])
            raise PlanError(f"{where}: row {dup} appears twice without being marked padded")
        if len(real) != c.examples_per_epoch[e]:
            raise PlanError(
                f"{where}: {len(real)} distinct examples, manifest says {c.examples_per_epoch[e]}"
            )
        sorted_rows, at, cluster_ids, cluster_of = rows_index
        sample = np.flatnonzero(~cols["padded"])[:: max(1, n // 4096)]  # sampled id/cluster check
        rows = cols["row"][sample]
        if not len(rows):
            return
        pos = np.minimum(np.searchsorted(sorted_rows, rows), max(len(sorted_rows) - 1, 0))
        missing = np.flatnonzero(sorted_rows[pos] != rows) if len(sorted_rows) else [0]
        if len(missing):
            raise PlanError(f"{where}: row {int(rows[missing[0]])} is in no cluster")
        want_ids = cluster_ids.take(pa.array(at[pos])).to_numpy(zero_copy_only=False)
        wrong = np.flatnonzero((cols["id"][sample] != want_ids)
                               | (cols["cluster"][sample] != cluster_of[at[pos]]))
        if len(wrong):
            raise PlanError(f"{where}: row {int(rows[wrong[0]])} has a wrong id or cluster")


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
