"""The tasks Dask runs: each reads its inputs from the work directory and writes its output there.

Tasks never receive or return large objects: the embeddings, the index and the neighbour lists
travel through the shared work directory (memory-mapped ``.npy`` / Parquet), so a retried task
on another worker finds everything it needs, and a result does not live only in a worker's
memory that a crash would lose. Every algorithm is the core's (``b3mine.neighbours``,
``b3mine.graph``, ``b3mine.mining``); this module only moves data in and out of shards.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp

from b3mine import clustering
from b3mine.batches import Batches
from b3mine.config import EmbeddingSource, MiningConfig
from b3mine.cores import usable_cores
from b3mine.embeddings import (
    Embeddings,
    duplicate_id_error,
    first_duplicate,
    id_lines,
    load_npy,
    read_checked,
    open_parquet,
    parquet_files,
    require_ids_path,
    source_columns,
    vector_column,
)
from b3mine.errors import InputError
from b3mine.mining import (
    build_graph,
    finish_plan,
    make_batches,
    make_clusters,
    make_negatives,
)
from b3mine.neighbours import (
    Neighbours,
    build_index,
    max_norm,
    merge_ranked,
    probe_lists,
    resolve_device,
    search_index,
    torch_search,
    trained_ivf,
)
from b3mine.plan import PlanLineage

from pipelines.checkpoints import (
    WorkDir,
    allocate_npy,
    atomic_path,
    fill_npy,
    write_npy,
    write_parquet,
)

QUERIES, TARGETS = "queries.npy", "targets.npy"
RAW_QUERIES, RAW_TARGETS = "raw_queries.npy", "raw_targets.npy"
IDS = "ids.npy"
ID_PARTS = "id-parts"  # per load shard: its ids and rows in hash-bucket order
ID_BUCKET_ROWS = 1 << 20  # about this many ids per uniqueness bucket: one bucket task's memory
INDEX = "index.faiss"


class InjectedFailure(RuntimeError):
    """Raised by a task when the test hook ``B3MINE_PIPELINE_FAIL_STAGE`` names its stage."""


def _maybe_fail(stage: str, fail: bool) -> None:
    if fail:
        raise InjectedFailure(f"injected failure in stage {stage!r} "
                              "(B3MINE_PIPELINE_FAIL_STAGE test hook)")


# -- reading the input by shard --------------------------------------------------------------

@dataclass(frozen=True)
class ParquetRows:
    """A Parquet file set addressed by global row ranges, read one row group at a time."""

    files: tuple[str, ...]
    group_rows: tuple[tuple[int, ...], ...]  # rows of every row group, per file

    @classmethod
    def open(cls, path: str | Path, columns: list[str]) -> ParquetRows:
        files = parquet_files(Path(path))
        groups = []
        for f in files:
            meta = open_parquet(f, columns)
            groups.append(tuple(meta.metadata.row_group(g).num_rows
                                for g in range(meta.num_row_groups)))
        return cls(tuple(str(f) for f in files), tuple(groups))

    @property
    def n_rows(self) -> int:
        return sum(sum(g) for g in self.group_rows)

    def boundaries(self) -> list[int]:
        """Global row offsets where row groups start (and the end): natural shard edges."""
        out, offset = [0], 0
        for groups in self.group_rows:
            for n in groups:
                offset += n
                out.append(offset)
        return sorted(set(out))

    def read(self, start: int, stop: int, columns: list[str]) -> pa.Table:
        pieces, offset = [], 0
        for f, groups in zip(self.files, self.group_rows):
            pf = None
            for g, n in enumerate(groups):
                lo, hi = offset, offset + n
                offset = hi
                if hi <= start or lo >= stop:
                    continue
                pf = pf or pq.ParquetFile(f, memory_map=True, page_checksum_verification=True)
                t = read_checked(f, lambda: pf.read_row_group(g, columns=columns))
                a, b = max(start, lo) - lo, min(stop, hi) - lo
                pieces.append(t.slice(a, b - a))
        return pa.concat_tables(pieces) if len(pieces) > 1 else pieces[0]


@dataclass(frozen=True)
class SourcePlan:
    """What the load stage needs to know about the input before reading any vector."""

    source: EmbeddingSource
    n_rows: int
    dim: int
    paired: bool
    shards: tuple[tuple[int, int], ...]  # global [start, stop) row ranges
    id_buckets: int = 1  # hash buckets of the partitioned id-uniqueness check

    @property
    def label(self) -> str:
        return str(Path(self.source.path))  # what load_embeddings records as Embeddings.source


def _source_columns(source: EmbeddingSource) -> list[str]:
    cols = [source.id_column, source.column]
    return cols + [source.target_column] if source.target_column else cols


def plan_source(source: EmbeddingSource, shard_rows: int) -> SourcePlan:
    """Count rows, find the dimension and cut the input into shards (runs on the client)."""
    path = Path(source.path)
    if not path.exists():
        raise InputError("no such file or directory", file=str(path))
    paired = bool(source.target_column or source.target_path)
    if path.suffix == ".npy":
        require_ids_path(source)
        q = load_npy(path)
        n, dim = (q.shape[0], q.shape[1]) if q.ndim == 2 else (q.shape[0], 0)
        _check_id_count(Path(source.ids_path), n, str(path))
        edges = list(range(0, n, shard_rows)) + [n]
    else:
        rows = ParquetRows.open(path, _source_columns(source))
        n = rows.n_rows
        first = rows.read(0, min(1, n), [source.column]) if n else None
        dim = len(first.column(0)[0].as_py() or []) if first is not None and first.num_rows else 0
        edges = _merge_edges(rows.boundaries(), shard_rows)
    shards = tuple((a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a)
    return SourcePlan(source=source, n_rows=n, dim=dim, paired=paired, shards=shards,
                      id_buckets=max(1, -(-n // ID_BUCKET_ROWS)))


def _check_id_count(path: Path, n_rows: int, label: str) -> None:
    """The core loader's alignment check, without reading the ids into memory."""
    if not path.exists():
        raise InputError("no such id file", file=str(path))
    if path.suffix == ".npy":
        ids = load_npy(path)
        got = str(len(ids)) if ids.ndim == 1 else f"an array of shape {ids.shape}"
        aligned = ids.ndim == 1 and len(ids) == n_rows
    else:
        count = sum(1 for _ in id_lines(path))
        got, aligned = str(count), count == n_rows
    if not aligned:
        raise InputError("ids are not aligned with the embeddings", file=label,
                         expected=f"{n_rows} ids", got=got)


def _id_file_slice(path: Path, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of an id file: a slice of a memory-mapped ``.npy``; a text file is
    read from its start up to ``stop`` (one line at a time: give ``.npy`` ids past ~10M rows)."""
    if path.suffix == ".npy":
        return np.asarray(load_npy(path)[start:stop])
    return np.array(list(islice(id_lines(path), start, stop)), dtype=str)


def _merge_edges(boundaries: list[int], shard_rows: int) -> list[int]:
    """Group consecutive row groups into shards of about ``shard_rows`` rows."""
    edges = [boundaries[0]]
    for b in boundaries[1:]:
        if b - edges[-1] >= shard_rows or b == boundaries[-1]:
            edges.append(b)
    return edges


def _read_shard(plan: SourcePlan, start: int, stop: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """ids, queries and targets of rows [start, stop) as read from the input."""
    src = plan.source
    path = Path(src.path)
    if path.suffix == ".npy":
        q = np.asarray(load_npy(path)[start:stop])
        t = np.asarray(load_npy(Path(src.target_path))[start:stop]) \
            if src.target_path else None
        return _id_file_slice(Path(src.ids_path or ""), start, stop), q, t
    rows = ParquetRows.open(path, _source_columns(src))
    table = rows.read(start, stop, _source_columns(src))
    col = table.column(src.id_column)
    if col.null_count:
        row = start + int(np.argmax(col.is_null().to_numpy(zero_copy_only=False)))
        raise InputError("null id", file=str(path), column=src.id_column, row=row)
    ids = col.to_numpy(zero_copy_only=False)
    q = vector_column(table, src.column, str(path))
    t = None
    if src.target_column:
        t = vector_column(table, src.target_column, str(path))
    elif src.target_path:
        trows = ParquetRows.open(src.target_path, [src.id_column, src.column])
        ttable = trows.read(start, stop, [src.id_column, src.column])
        tids = ttable.column(src.id_column).to_numpy(zero_copy_only=False)
        if len(tids) != len(ids) or (tids != ids).any():
            bad = int(np.argmax(tids != ids)) if len(tids) == len(ids) else len(tids)
            raise InputError("target file's ids are not aligned with the query file's",
                             file=src.target_path, column=src.id_column, row=start + bad)
        t = vector_column(ttable, src.column, src.target_path)
    return ids, q, t


def allocate_vectors(work: WorkDir, plan: SourcePlan, normalize: bool) -> None:
    """Create the work directory's ``.npy`` files once, so shard tasks fill disjoint slices."""
    names = [QUERIES] + ([TARGETS] if plan.paired else [])
    if normalize:
        names += [RAW_QUERIES] + ([RAW_TARGETS] if plan.paired else [])
    for name in names:
        allocate_npy(work.path(name), (plan.n_rows, plan.dim), np.float32)


def load_shard(work_root: str, plan: SourcePlan, start: int, stop: int, normalize: bool) -> str:
    """Read, validate and (if asked) normalise rows [start, stop) into the work directory, and
    write the shard's ids for the uniqueness buckets. Returns the ids' dtype.

    Idempotent: a retry rewrites the same slice with the same bytes.
    """
    work = WorkDir(work_root)
    ids, q, t = _read_shard(plan, start, stop)
    try:  # uniqueness is checked across shards, by id_bucket_task
        emb = Embeddings.from_arrays(ids, q, t, source=plan.label, unique_ids=False,
                                     columns=source_columns(plan.source))
    except InputError as exc:  # report the row in the whole input, not in the shard
        row = None if exc.row is None else start + exc.row
        raise InputError(exc.problem, file=exc.file, column=exc.column, row=row,
                         expected=exc.expected, got=exc.got) from exc
    if emb.dim != plan.dim:
        raise InputError("inconsistent embedding dimension", file=plan.label,
                         column=plan.source.column, row=start,
                         expected=f"dimension {plan.dim}", got=str(emb.dim))
    prepared = emb.normalized() if normalize else emb
    pairs = [(QUERIES, prepared.queries), (TARGETS, prepared.targets)]
    if normalize:
        pairs += [(RAW_QUERIES, emb.queries), (RAW_TARGETS, emb.targets)]
    for name, m in pairs:
        if m is not None:
            fill_npy(work.path(name), start, m)
    _write_id_part(work, start, emb.ids, plan.id_buckets)
    return emb.ids.dtype.str


def _id_part_paths(work: WorkDir, start: int) -> tuple[Path, Path]:
    return (work.path(f"{ID_PARTS}/{start:012d}.npy"),
            work.path(f"{ID_PARTS}/{start:012d}.bounds.npy"))


def _write_id_part(work: WorkDir, start: int, ids: np.ndarray, buckets: int) -> None:
    """The shard's (id, row) pairs ordered by hash bucket, rows ascending within one, and
    where each bucket starts: a bucket task reads its slice of every part and nothing else."""
    from pandas.util import hash_array  # vectorised hashes of ints and strings, fixed key

    bucket = hash_array(ids) % np.uint64(buckets)
    order = np.argsort(bucket, kind="stable")
    part = np.empty(len(ids), dtype=[("id", ids.dtype), ("row", np.int64)])
    part["id"], part["row"] = ids[order], start + order
    pairs, bounds = _id_part_paths(work, start)
    write_npy(pairs, part)
    write_npy(bounds, np.searchsorted(bucket[order], np.arange(buckets + 1, dtype=np.uint64)))


def id_bucket_task(work_root: str, plan: SourcePlan, bucket: int
                   ) -> tuple[Any, int, int] | None:
    """The smallest duplicated id among the ids hashed to ``bucket``, with the input rows of
    its first two occurrences (``first_duplicate``), or None: a partitioned uniqueness check,
    so no task holds every id."""
    work = WorkDir(work_root)
    ids, rows = [], []
    for start, _ in plan.shards:  # ascending, so rows stay ascending
        pairs, bounds = _id_part_paths(work, start)
        a, b = np.load(bounds)[bucket : bucket + 2]
        piece = np.asarray(np.load(pairs, mmap_mode="r")[a:b])
        ids.append(piece["id"])  # shards' string widths may differ: concatenate the fields
        rows.append(piece["row"])
    duplicate = first_duplicate(np.concatenate(ids))
    if duplicate is None:
        return None
    value, i, j = duplicate
    row = np.concatenate(rows)
    return value, int(row[i]), int(row[j])


def finish_load(work_root: str, plan: SourcePlan, normalize: bool, id_dtypes: list[str],
                duplicates: list[tuple[Any, int, int] | None], fail: bool = False
                ) -> dict[str, Any]:
    """The uniqueness buckets' verdict, ``ids.npy`` assembled a shard at a time, and the
    dataset fingerprint (streamed over memory-mapped rows)."""
    _maybe_fail("load", fail)
    work = WorkDir(work_root)
    found = [d for d in duplicates if d is not None]
    if found:  # the smallest duplicated id, as the core's check_unique_ids reports it
        raise duplicate_id_error(min(found), plan.label)
    kinds = {np.dtype(d).kind for d in id_dtypes}
    if "U" in kinds and len(kinds) > 1:
        raise InputError("ids mix integers and strings across the input's files",
                         file=plan.label, column=plan.source.id_column)
    # strings: the widest shard's width; integers of mixed signedness: int64, as hashed
    dtype = np.dtype(np.int64) if kinds == {"i", "u"} else np.result_type(*id_dtypes)
    with atomic_path(work.path(IDS)) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(plan.n_rows,))
        for start, _ in plan.shards:
            part = np.load(_id_part_paths(work, start)[0], mmap_mode="r")
            out[part["row"]] = part["id"]
        out.flush()
        del out
    fingerprint = work_embeddings(work, read_ids(work), plan.label, raw=normalize).fingerprint()
    return {"fingerprint": fingerprint, "n_rows": plan.n_rows, "dim": plan.dim,
            "paired": plan.paired, "source": plan.label}


def read_ids(work: WorkDir) -> np.ndarray:
    """The dataset ids, memory-mapped: a task that looks up some rows' ids reads their pages
    only (int64, or fixed-width strings)."""
    return np.load(work.path(IDS), mmap_mode="r")


def work_embeddings(work: WorkDir, ids: np.ndarray, label: str, raw: bool = False) -> Embeddings:
    """The job's embeddings, memory-mapped from the work directory (already validated)."""
    qn, tn = (RAW_QUERIES, RAW_TARGETS) if raw else (QUERIES, TARGETS)
    q = np.load(work.path(qn), mmap_mode="r")
    t = np.load(work.path(tn), mmap_mode="r") if work.path(tn).exists() else None
    return Embeddings(ids=ids, queries=q, targets=t, source=label)


# -- neighbours --------------------------------------------------------------------------------

class _WorkerCache:
    """Per-process LRU of loaded indexes, keyed by file path + mtime.

    A worker process loads (or builds) an index once and serves every block task it runs from
    the same object: the index is never a task argument, so it is never pickled or shipped.
    """

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self.loads = 0  # how many times this process loaded an index (tests: once per worker)
        self._items: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def get(self, key: tuple, load: Callable[[], Any]) -> Any:
        with self._lock:  # worker threads share the process: load once, not once per thread
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            value = load()
            self.loads += 1
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)
            return value


INDEX_CACHE = _WorkerCache()
NORM_CACHE = _WorkerCache(size=4)  # largest target norm per target file (a float each)


def release_indexes() -> int:
    """(run on every worker after the neighbour stage) drop cached indexes: the later stages
    need the memory (an IVF-Flat index is as large as the corpus)."""
    n = len(INDEX_CACHE._items)
    INDEX_CACHE.clear()
    return n


def _target_matrix_path(work: WorkDir) -> Path:
    return work.path(TARGETS) if work.path(TARGETS).exists() else work.path(QUERIES)


def _uses_torch(config: MiningConfig) -> bool:
    nb = config.neighbours
    return nb.index == "torch" or (nb.index == "flat" and resolve_device(nb.device) == "cuda")


@contextmanager
def alone_on_host(config: MiningConfig) -> Iterator[None]:
    """FAISS threads for a task that runs alone (every other task waits for its output): all
    the cores the host lets the process use, not one worker's share; a config that sets
    ``neighbours.threads`` keeps its own."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(config.neighbours.threads or usable_cores())
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def build_ann_index(work_root: str, config: MiningConfig, fail: bool = False) -> str:
    """Build an HNSW index in one task (the core's ``build_index``) and save it."""
    _maybe_fail("neighbours", fail)
    import faiss

    work = WorkDir(work_root)
    targets = np.ascontiguousarray(np.load(_target_matrix_path(work), mmap_mode="r"))
    with alone_on_host(config):
        index = build_index(targets, config.rank_depth, config.neighbours)
    with atomic_path(work.path(INDEX)) as tmp:
        faiss.write_index(index, str(tmp))
    return str(work.path(INDEX))


# -- IVF built by many tasks: train once, fill row ranges in parallel, merge on disk ----------
IVF_DIR = "ivf"
IVF_TRAINED, IVF_LISTS = f"{IVF_DIR}/trained.faiss", f"{IVF_DIR}/lists.ivfdata"
IVF_FILL_ROWS = 262_144  # rows per fill task: its memory is this many vectors, not N


def ivf_fill_ranges(n_rows: int) -> list[tuple[int, int]]:
    return [(a, min(a + IVF_FILL_ROWS, n_rows)) for a in range(0, n_rows, IVF_FILL_ROWS)]


def ivf_part_path(work: WorkDir, start: int, stop: int) -> Path:
    return work.path(IVF_DIR) / f"rows-{start:012d}-{stop:012d}.faiss"


def train_ivf_task(work_root: str, config: MiningConfig, fail: bool = False) -> str:
    """Train the empty IVF index on the core's seeded sample and save it; only the sample is
    read from the memory-mapped targets."""
    _maybe_fail("neighbours", fail)
    import faiss

    work = WorkDir(work_root)
    targets = np.load(_target_matrix_path(work), mmap_mode="r")
    with alone_on_host(config):
        index = trained_ivf(targets, config.neighbours)
    work.path(IVF_DIR).mkdir(exist_ok=True)
    with atomic_path(work.path(IVF_TRAINED)) as tmp:
        faiss.write_index(index, str(tmp))
    return str(work.path(IVF_TRAINED))


def ivf_lists_path(work: WorkDir, start: int, stop: int) -> Path:
    return work.path(IVF_DIR) / f"lists-{start:012d}-{stop:012d}.npy"


def fill_ivf_task(work_root: str, start: int, stop: int) -> str:
    """Add target rows [start, stop) (ids = row numbers) to a copy of the trained index. The
    rows' top-nprobe coarse lists are computed once here and kept: the first is where a row is
    added, and a self-search (queries = targets) scans them all without a second coarse
    search."""
    import faiss
    from faiss.contrib.ivf_tools import add_preassigned

    work = WorkDir(work_root)
    index = faiss.read_index(str(work.path(IVF_TRAINED)))
    rows = np.ascontiguousarray(np.load(_target_matrix_path(work), mmap_mode="r")[start:stop],
                                dtype=np.float32)
    lists = probe_lists(index, rows)
    first, ids = np.ascontiguousarray(lists[:, 0]), np.arange(start, stop, dtype=np.int64)
    add_preassigned(index, rows, first, ids)  # holds only raw pointers: keep the arrays named
    with atomic_path(ivf_lists_path(work, start, stop)) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, lists.astype(np.int32))
    path = ivf_part_path(work, start, stop)
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))
    return str(path)


def merge_ivf_task(work_root: str, ranges: list[tuple[int, int]]) -> str:
    """Merge the filled parts, in row order, into one index whose inverted lists live on disk
    (``faiss.contrib.ondisk``: the parts are memory-mapped, never loaded whole). The index
    file records the lists' path, so the lists file is written in place and the index file,
    renamed into place last, marks the whole as complete."""
    import faiss
    from faiss.contrib.ondisk import merge_ondisk

    work = WorkDir(work_root)
    lists = work.path(IVF_LISTS)
    lists.unlink(missing_ok=True)  # a merge killed half-way left a partial file
    index = faiss.read_index(str(work.path(IVF_TRAINED)))
    merge_ondisk(index, [str(ivf_part_path(work, a, b)) for a, b in ranges], str(lists))
    with atomic_path(work.path(INDEX)) as tmp:
        faiss.write_index(index, str(tmp))
    for a, b in ranges:  # each part duplicates its rows of the corpus on disk
        ivf_part_path(work, a, b).unlink(missing_ok=True)
    return str(work.path(INDEX))


def _worker_index(work: WorkDir, config: MiningConfig, target_range: tuple[int, int] | None):
    """The index for this job on this worker: flat ones built from the memory-mapped targets
    (optionally one corpus shard), IVF/HNSW read from the file ``build_ann_index`` wrote."""
    if config.neighbours.index in ("ivf", "hnsw"):
        path = work.path(INDEX)

        def load():
            import faiss

            # an IVF index's lists are on disk (merge_ivf_task): FAISS memory-maps them, so
            # they are file pages shared by the host's workers, not a copy in each
            return faiss.read_index(str(path))

        return INDEX_CACHE.get(("file", str(path), path.stat().st_mtime_ns), load)
    path = _target_matrix_path(work)
    a, b = target_range or (0, None)

    def build():
        m = np.load(path, mmap_mode="r")[a:b]
        return build_index(np.ascontiguousarray(m), config.rank_depth, config.neighbours)

    return INDEX_CACHE.get(("flat", str(path), path.stat().st_mtime_ns, a, b), build)


def part_name(start: int, stop: int, target_shards: int) -> str:
    """A block's file name carries its geometry: a resumed job whose block size or corpus
    sharding changed never reuses (and so never mixes in) a block cut another way."""
    return f"part-t{target_shards}-{start:012d}-{stop:012d}"


def part_path(work: WorkDir, part: str) -> Path:
    return work.path("neighbours") / f"{part}.parquet"


def _target_norm(work: WorkDir) -> float:
    """Largest target norm (the canonical order's error bound), once per worker and job."""
    path = _target_matrix_path(work)
    return NORM_CACHE.get((str(path), path.stat().st_mtime_ns),
                           lambda: max_norm(np.load(path, mmap_mode="r")))


def _search(work: WorkDir, config: MiningConfig, start: int, stop: int, k: int,
            target_range: tuple[int, int] | None = None) -> Neighbours:
    queries = np.load(work.path(QUERIES), mmap_mode="r")[start:stop]
    a, b = target_range or (0, None)
    targets = np.load(_target_matrix_path(work), mmap_mode="r")[a:b]
    norm = _target_norm(work)  # of all targets: one bound for every shard, as in-process
    nb = config.neighbours
    if _uses_torch(config):
        return torch_search(queries, targets, k, nb.block_size, resolve_device(nb.device),
                            target_norm=norm)
    index = _worker_index(work, config, target_range)
    # Blocks of the config's block_size, as in-process; the order is canonical either way.
    return search_index(index, queries, k, nb.block_size, targets=targets, target_norm=norm,
                        query_lists=_query_lists(work, config, start, stop))


def _query_lists(work: WorkDir, config: MiningConfig, start: int, stop: int
                 ) -> np.ndarray | None:
    """Queries [start, stop)'s IVF coarse lists as the fill tasks saved them, when the queries
    are the targets (else, or for a work directory from before they were saved: None)."""
    if config.neighbours.index != "ivf" or work.path(TARGETS).exists():
        return None
    parts = []
    for a, b in ivf_fill_ranges(_n_targets(work)):
        if b > start and a < stop:
            path = ivf_lists_path(work, a, b)
            if not path.exists():
                return None
            parts.append(np.load(path, mmap_mode="r")[max(start, a) - a : min(stop, b) - a])
    return np.concatenate(parts).astype(np.int64) if parts else None


def search_block(work_root: str, config: MiningConfig, part: str, start: int, stop: int,
                 k: int, delay: float = 0.0, fail: bool = False) -> int:
    """Top-k of queries [start, stop) against all targets -> ``neighbours/part-<part>.parquet``.

    ``delay`` (seconds) is a test hook (``B3MINE_PIPELINE_TASK_DELAY``) that makes the stage
    slow enough to kill a worker in the middle of it.
    """
    _maybe_fail("neighbours", fail)
    if delay:
        time.sleep(delay)
    work = WorkDir(work_root)
    found = _search(work, config, start, stop, k)
    write_neighbours_part(work, part, found, n_targets=_n_targets(work))
    return stop - start


def search_corpus_shard(work_root: str, config: MiningConfig, start: int, stop: int, k: int,
                        t_start: int, t_stop: int) -> Neighbours:
    """Top-k of queries [start, stop) within target rows [t_start, t_stop) (global row ids)."""
    found = _search(WorkDir(work_root), config, start, stop, min(k, t_stop - t_start),
                    (t_start, t_stop))
    rows = np.where(found.rows >= 0, found.rows + t_start, -1)
    return Neighbours(rows=rows, scores=found.scores)


def merge_topk(work: WorkDir, start: int, stop: int, parts: list[Neighbours], k: int
               ) -> Neighbours:
    """Exact merge of per-corpus-shard top-k lists of queries [start, stop) into the canonical
    top-k of the whole corpus (``b3mine.neighbours.merge_ranked``): what one search gives."""
    queries = np.load(work.path(QUERIES), mmap_mode="r")
    targets = np.load(_target_matrix_path(work), mmap_mode="r")
    return merge_ranked(queries, targets, np.arange(start, stop), parts, k, _target_norm(work))


def merge_block(work_root: str, part: str, start: int, stop: int, k: int,
                *parts: Neighbours) -> int:
    """Merge one query block's corpus-shard results and write its part file."""
    work = WorkDir(work_root)
    merged = merge_topk(work, start, stop, list(parts), k)
    write_neighbours_part(work, part, merged, n_targets=_n_targets(work))
    return merged.rows.shape[0]


def _n_targets(work: WorkDir) -> int:
    return int(np.load(_target_matrix_path(work), mmap_mode="r").shape[0])


def write_neighbours_part(work: WorkDir, part: str, found: Neighbours, n_targets: int) -> None:
    k = found.rows.shape[1]
    # int32 rows halve the checkpoint when they fit; -1 ("no result") survives the cast.
    rows = found.rows.astype(np.int32) if n_targets < 2**31 else found.rows
    table = pa.table({
        "rows": pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), k),
        "scores": pa.FixedSizeListArray.from_arrays(
            pa.array(found.scores.reshape(-1), type=pa.float32()), k),
    })
    write_parquet(part_path(work, part), table)


def read_neighbours(work: WorkDir, parts: list[str], scores: bool = True) -> Neighbours:
    """Concatenate the part files (in row order) into the (N, k) rank lists."""
    rows, vals = [], []
    columns = ["rows", "scores"] if scores else ["rows"]
    for part in parts:
        t = pq.read_table(part_path(work, part), columns=columns)
        col = t.column("rows").combine_chunks()
        k = col.type.list_size
        rows.append(col.flatten().to_numpy().reshape(-1, k).astype(np.int64))
        if scores:
            s = t.column("scores").combine_chunks()
            vals.append(s.flatten().to_numpy().reshape(-1, k))
    r = np.concatenate(rows) if rows else np.zeros((0, 0), np.int64)
    s = np.concatenate(vals) if vals else np.zeros(r.shape, np.float32)
    return Neighbours(rows=r, scores=s)


# -- graph, clusters, batches, negatives, plan ------------------------------------------------

def graph_task(work_root: str, config: MiningConfig, parts: list[str], fail: bool = False
               ) -> dict[str, Any]:
    """The window graph from the merged rank lists (``b3mine.mining.build_graph``)."""
    _maybe_fail("graph", fail)
    work = WorkDir(work_root)
    neighbours = read_neighbours(work, parts, scores=False)
    graph = build_graph(neighbours, config)
    del neighbours
    upper = sp.triu(graph, k=1).tocoo()
    write_parquet(work.path("graph.parquet"),
                  pa.table({"src": pa.array(upper.row.astype(np.int64)),
                            "dst": pa.array(upper.col.astype(np.int64))}))
    return {"n_nodes": int(graph.shape[0]), "edges": int(graph.nnz // 2)}


def read_graph(work: WorkDir, n_nodes: int) -> sp.csr_matrix:
    """The symmetric CSR graph exactly as ``window_graph`` returned it (int8 ones, sorted)."""
    t = pq.read_table(work.path("graph.parquet"))
    src, dst = t.column("src").to_numpy(), t.column("dst").to_numpy()
    r, c = np.concatenate([src, dst]), np.concatenate([dst, src])
    g = sp.csr_matrix((np.ones(len(r), np.int8), (r, c)), shape=(n_nodes, n_nodes))
    g.sort_indices()
    return g


def clusters_task(work_root: str, config: MiningConfig, n_nodes: int, fail: bool = False
                  ) -> dict[str, Any]:
    """One task over the whole graph (``b3mine.mining.make_clusters``)."""
    _maybe_fail("clusters", fail)
    work = WorkDir(work_root)
    c = make_clusters(read_graph(work, n_nodes), config)
    n_clusters, k = c.members.shape
    write_parquet(work.path("clusters.parquet"), pa.table({
        "cluster": pa.array(np.repeat(np.arange(n_clusters, dtype=np.int64), k)),
        "row": pa.array(c.members.reshape(-1).astype(np.int64)),
        "padded": pa.array(c.padded.reshape(-1)),
    }))
    write_parquet(work.path("dropped.parquet"),
                  pa.table({"row": pa.array(c.dropped.astype(np.int64))}))
    write_parquet(work.path("communities.parquet"),
                  pa.table({"size": pa.array(np.asarray(c.community_sizes, np.int64))}))
    return {"n_clusters": int(n_clusters), "cluster_size": int(k),
            "communities": int(c.communities)}


def read_clusters(work: WorkDir, meta: dict[str, Any]) -> clustering.Clusters:
    t = pq.read_table(work.path("clusters.parquet"))
    shape = (meta["n_clusters"], meta["cluster_size"])
    members = t.column("row").to_numpy().reshape(shape)
    padded = t.column("padded").to_numpy(zero_copy_only=False).reshape(shape)
    dropped = pq.read_table(work.path("dropped.parquet")).column("row").to_numpy()
    sizes = pq.read_table(work.path("communities.parquet")).column("size").to_numpy()
    return clustering.Clusters(members=members, padded=padded, dropped=dropped,
                               community_sizes=sizes)


def batches_task(work_root: str, config: MiningConfig, cluster_meta: dict[str, Any],
                 n_nodes: int, fail: bool = False) -> dict[str, Any]:
    """Per-epoch batches (``b3mine.mining.make_batches``)."""
    _maybe_fail("batches", fail)
    work = WorkDir(work_root)
    # only graph-aware grouping needs the graph; random grouping skips reading it
    graph = read_graph(work, n_nodes) if config.batch_grouping != "random" else None
    b = make_batches(read_clusters(work, cluster_meta), config, graph)
    write_parquet(work.path("batches.parquet"), pa.table({
        "row": pa.array(b.rows.reshape(-1)),
        "cluster": pa.array(b.cluster.reshape(-1)),
        "padded": pa.array(b.padded.reshape(-1)),
    }))
    return {"shape": list(b.rows.shape)}


def read_batches(work: WorkDir, meta: dict[str, Any]) -> Batches:
    t = pq.read_table(work.path("batches.parquet"))
    shape = tuple(meta["shape"])
    return Batches(rows=t.column("row").to_numpy().reshape(shape),
                   cluster=t.column("cluster").to_numpy().reshape(shape),
                   padded=t.column("padded").to_numpy(zero_copy_only=False).reshape(shape))


def negatives_task(work_root: str, config: MiningConfig, load_meta: dict[str, Any],
                   parts: list[str], cluster_meta: dict[str, Any], fail: bool = False
                   ) -> dict[str, Any]:
    """Extra hard negatives (``b3mine.mining.make_negatives``): one task, because HNPS draws
    from one seeded stream cluster after cluster, which is what makes it reproducible."""
    _maybe_fail("negatives", fail)
    work = WorkDir(work_root)
    if config.negatives.mode == "none":
        return {"present": False}
    emb = work_embeddings(work, read_ids(work), load_meta["source"])
    neighbours = read_neighbours(work, parts)
    clusters = read_clusters(work, cluster_meta)
    neg = make_negatives(emb, neighbours, clusters, config)
    assert neg is not None
    write_parquet(work.path("negatives.parquet"), pa.table({
        "negative_rows": pa.FixedSizeListArray.from_arrays(pa.array(neg.reshape(-1)),
                                                           neg.shape[1])}))
    return {"present": True}


def read_negatives(work: WorkDir, meta: dict[str, Any]) -> np.ndarray | None:
    if not meta.get("present"):
        return None
    col = pq.read_table(work.path("negatives.parquet")).column("negative_rows").combine_chunks()
    return col.flatten().to_numpy().reshape(len(col), col.type.list_size)


def write_task(work_root: str, config: MiningConfig, out: str, metas: dict[str, dict[str, Any]],
               timings: dict[str, float], report: bool = True, fail: bool = False,
               skipped_stages: list[str] | None = None,
               lineage: PlanLineage | None = None) -> str:
    """Report and atomic write of the plan (``b3mine.mining.finish_plan``)."""
    _maybe_fail("write", fail)
    work = WorkDir(work_root)
    load = metas["load"]
    emb = work_embeddings(work, read_ids(work), load["source"])
    graph = read_graph(work, load["n_rows"])
    clustered = read_clusters(work, metas["clusters"])
    batches = read_batches(work, metas["batches"])
    negatives = read_negatives(work, metas["negatives"])
    plan = finish_plan(emb, load["fingerprint"], config, graph, clustered, batches, negatives,
                       out, timings=timings, report=report, skipped_stages=skipped_stages,
                       lineage=lineage)
    return str(plan.path)


__all__ = [
    "ParquetRows", "SourcePlan", "plan_source", "allocate_vectors", "load_shard", "finish_load",
    "build_ann_index", "train_ivf_task", "fill_ivf_task", "merge_ivf_task", "search_block",
    "search_corpus_shard", "merge_topk", "merge_block",
    "graph_task", "clusters_task", "batches_task", "negatives_task", "write_task",
    "read_neighbours", "read_graph", "InjectedFailure",
]
