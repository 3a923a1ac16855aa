"""Region-parallel stages of the Dask engine (``MiningConfig.region_size`` set).

After ``load`` and ``neighbours`` (unchanged), the job runs, each stage checkpointed:

    regions   fine cells (the IVF coarse lists, or k-means): one task per neighbour block
              assigns its rows and counts them per cell, one per block counts the window
              entries between cells, one task cuts the cell graph into blocks of at most S rows
              (KaMinPar), one per block writes each row's final region (``b3mine.regions``)
    graph     the partitioned join: one task per neighbour block re-sorts its rank lists by
              region (one Parquet row group per region), so a region task reads only its rows
    clusters  one task per region: induced window graph, clusters of K, extra negatives; then
              one task for the leftover region (the < K rows every region left over)
    batches   one task per region copies its clusters into the global cluster table; then one
              task per (epoch, key range) places the clusters whose keys fall in its range
    write     one task: report and the atomic plan write (``b3mine.mining.finish_plan``)

No task holds the graph, the rank lists or the vectors of more than one region or one block;
the cluster table, the negatives and the batch rows are memory-mapped ``.npy`` files that tasks
fill at disjoint offsets. Only the write task reads the whole plan (its tables: a few integers
per row). Every task's output is renamed into place when complete, and a task whose output
exists is not run again, so a resumed job redoes only unfinished regions or blocks.
"""
from __future__ import annotations

import dataclasses
import json
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from b3mine import regions as core
from b3mine.batches import Batches, epoch_rng
from b3mine.clustering import Clusters
from b3mine.config import MiningConfig
from b3mine.mining import finish_plan
from b3mine.negatives import positive_scores
from b3mine.neighbours import Neighbours

from pipelines.checkpoints import (
    WorkDir,
    allocate_npy,
    atomic_path,
    fill_npy,
    write_json,
    write_npy,
    write_parquet,
)
from pipelines.stages import (
    IVF_TRAINED,
    QUERIES,
    _maybe_fail,
    _query_lists,
    _target_matrix_path,
    read_ids,
    read_neighbours,
    work_embeddings,
)

if TYPE_CHECKING:
    from pipelines.engine import _Job

REGION_STAGES = ("load", "neighbours", "regions", "graph", "clusters", "batches", "write")
CELL_CENTROIDS, CELL, REGION = (f"regions/{n}.npy" for n in ("cell-centroids", "cell", "region"))
LAYOUT = "regions/layout.npz"  # core.RegionLayout: read by every label task from here
MEMBERS, MEMBER_PADDED, NEGATIVES = "members.npy", "member_padded.npy", "negatives1.npy"
SAMPLE_PER_CELL = 64  # k-means training rows per cell
MIN_ROWS_PER_CELL = 39  # FAISS's k-means warns below this many rows per centroid
PAIR_FILES_PER_SUM = 16  # cell-pair files summed at once into the cell graph


def _read_layout(work: WorkDir) -> core.RegionLayout:
    """The regions stage's layout, written once by `partition_task`."""
    with np.load(work.path(LAYOUT)) as stored:
        return core.RegionLayout(**stored)


def _delay(seconds: float) -> None:
    if seconds:
        time.sleep(seconds)


# -- regions ---------------------------------------------------------------------------------

def cells_task(work_root: str, config: MiningConfig, n_rows: int, fail: bool = False) -> int:
    """The cells' centroids: the IVF coarse quantizer's, else a seeded k-means with
    ``CELLS_PER_REGION`` centroids per region on a sample of the queries."""
    _maybe_fail("regions", fail)
    work = WorkDir(work_root)
    if work.path(CELL_CENTROIDS).exists():  # resumed: the blocks already assigned used these
        return int(np.load(work.path(CELL_CENTROIDS), mmap_mode="r").shape[0])
    assert config.region_size is not None
    if config.neighbours.index == "ivf":
        import faiss

        index = faiss.read_index(str(work.path(IVF_TRAINED)))  # owns what the views below see
        quantizer = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
        centroids = quantizer.reconstruct_n(0, quantizer.ntotal)
    else:
        n_cells = max(1, min(core.CELLS_PER_REGION * core.n_regions(n_rows, config.region_size),
                             n_rows // MIN_ROWS_PER_CELL))
        q = np.load(work.path(QUERIES), mmap_mode="r")
        take = min(n_rows, SAMPLE_PER_CELL * n_cells)
        rng = np.random.default_rng([config.seed, 0x12E])
        sample = q[np.sort(rng.choice(n_rows, size=take, replace=False))]
        centroids = core.train_centroids(sample, n_cells, config.seed)
    work.path("regions").mkdir(exist_ok=True)
    allocate_npy(work.path(CELL), (n_rows,), np.int32)
    allocate_npy(work.path(REGION), (n_rows,), np.int32)
    write_npy(work.path(CELL_CENTROIDS), np.ascontiguousarray(centroids, np.float32))
    return int(centroids.shape[0])


def _counts_path(work: WorkDir, part: str):
    return work.path("regions") / f"counts-{part}.npy"


def _pairs_path(work: WorkDir, part: str):
    return work.path("regions") / f"pairs-{part}.npy"


def assign_task(work_root: str, config: MiningConfig, part: str, start: int, stop: int) -> str:
    """Cells of rows [start, stop) (their first IVF list when the fill tasks kept it, else
    the nearest centroid) and the block's rows per cell."""
    work = WorkDir(work_root)
    centroids = np.load(work.path(CELL_CENTROIDS), mmap_mode="r")  # read only without lists
    lists = _query_lists(work, config, start, stop)
    cells = (lists[:, 0].astype(np.int32) if lists is not None else
             core.nearest_cell(np.load(work.path(QUERIES), mmap_mode="r")[start:stop], centroids))
    fill_npy(work.path(CELL), start, cells)
    present, counts = np.unique(cells, return_counts=True)  # sparse: a block holds few cells
    write_npy(_counts_path(work, part), np.stack([present.astype(np.int64), counts]))
    return part


def _block_counts(work: WorkDir, parts: list[str]):
    """(cells present, rows of each) of every block, in row order, one file at a time."""
    for p in parts:
        cells, counts = np.load(_counts_path(work, p))
        yield cells, counts


def pairs_task(work_root: str, config: MiningConfig, part: str, start: int, stop: int,
               n_cells: int) -> str:
    """The block's window entries between different cells, counted per (cell, cell) pair."""
    work = WorkDir(work_root)
    window = read_neighbours(work, [part], scores=False).rows[:, config.p: config.p + config.m]
    cell = np.load(work.path(CELL), mmap_mode="r")
    window_cells = np.where(window >= 0, cell[np.maximum(window, 0)], -1)
    keys, counts = core.cell_pairs(cell[start:stop], window_cells, n_cells)
    write_npy(_pairs_path(work, part), np.stack([keys, counts.astype(np.int64)]))
    return part


def partition_task(work_root: str, config: MiningConfig, parts: list[str], n_cells: int
                   ) -> dict[str, Any]:
    """Cut the cell graph into blocks of at most S rows; the layout -> ``LAYOUT``."""
    assert config.region_size is not None
    work = WorkDir(work_root)
    sizes = np.zeros(n_cells, np.int64)
    for cells, counts in _block_counts(work, parts):
        sizes[cells] += counts
    graph = None
    for a in range(0, len(parts), PAIR_FILES_PER_SUM):  # a few files at a time: bounded memory
        pairs = np.concatenate([np.load(_pairs_path(work, p)) for p in
                                parts[a:a + PAIR_FILES_PER_SUM]], axis=1)
        g = core.cell_graph(pairs[0], pairs[1], n_cells)
        graph = g if graph is None else graph + g
    assert graph is not None
    part = core.partition_cells(graph, sizes, config.region_size, config.seed)
    layout = core.RegionLayout.of(part, sizes, config.region_size)
    coo = graph.tocoo()
    between = int(coo.data[part[coo.row] != part[coo.col]].sum()) // 2  # both ways stored
    with atomic_path(work.path(LAYOUT)) as tmp, open(tmp, "wb") as f:
        np.savez(f, **dataclasses.asdict(layout))
    return {"cells": int(n_cells), "cell_graph_edges": int(graph.nnz // 2),
            "window_entries_between_blocks": between, "n_regions": layout.n_regions,
            "chunked_blocks": int((layout.chunks > 1).sum())}


def _chunk_offsets(work: WorkDir, parts: list[str], layout: core.RegionLayout
                   ) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """Per block: (cells, rows of each in earlier blocks) for its cells in a block cut into
    chunks, the only rows whose place inside their block matters; None where it has none.
    Streams the counts files: it holds one block's counts and one entry per cell."""
    chunked = layout.chunks[layout.part] > 1
    if not chunked.any():
        return [None] * len(parts)
    running, out = np.zeros(len(layout.part), np.int64), []
    for cells, counts in _block_counts(work, parts):
        keep = cells[chunked[cells]]
        out.append((keep, running[keep]) if keep.size else None)
        running[cells] += counts
    return out


def label_task(work_root: str, start: int, stop: int,
               chunk_offsets: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    """Final region of rows [start, stop); returns the block's rows per final region."""
    work = WorkDir(work_root)
    layout = _read_layout(work)
    offsets = np.zeros(len(layout.part), np.int64)
    if chunk_offsets is not None:
        offsets[chunk_offsets[0]] = chunk_offsets[1]
    region = layout.regions(np.load(work.path(CELL), mmap_mode="r")[start:stop], offsets)
    fill_npy(work.path(REGION), start, region)
    return np.bincount(region, minlength=layout.n_regions)


def run_regions(job: _Job, n_rows: int, blocks: list[tuple[str, int, int]]) -> dict[str, Any]:
    work, config = job.work, job.config
    assert config.region_size is not None
    fail = job.fail_stage == "regions"
    n_cells = job.submit(cells_task, job.root, config, n_rows, fail=fail).result()
    total = 3 * len(blocks) + 1
    todo = [b for b in blocks if not _counts_path(work, b[0]).exists()]
    job.gather("regions", [job.submit(assign_task, job.root, config, *b) for b in todo],
               done=len(blocks) - len(todo), total=total)
    todo = [b for b in blocks if not _pairs_path(work, b[0]).exists()]
    job.gather("regions", [job.submit(pairs_task, job.root, config, *b, n_cells) for b in todo],
               done=2 * len(blocks) - len(todo), total=total)
    names = [name for name, _, _ in blocks]
    cut = job.submit(partition_task, job.root, config, names, n_cells).result()
    offsets = _chunk_offsets(work, names, _read_layout(work))
    futures = [job.submit(label_task, job.root, a, b, off)
               for (_, a, b), off in zip(blocks, offsets)]
    per_block = job.gather("regions", futures, done=2 * len(blocks) + 1, total=total)
    return {**cut, "region_sizes": [int(s) for s in np.sum(per_block, axis=0)]}


# -- graph: the partitioned join --------------------------------------------------------------

def _shuffle_path(work: WorkDir, part: str):
    return work.path("shuffle") / f"{part}.parquet"


def shuffle_task(work_root: str, config: MiningConfig, part: str, start: int, stop: int,
                 fail: bool = False) -> str:
    """Rank lists of one block re-sorted by region, one row group per region."""
    _maybe_fail("graph", fail)
    work = WorkDir(work_root)
    scores = config.negatives.mode == "hnips"
    found = read_neighbours(work, [part], scores=scores)
    region = np.load(work.path(REGION), mmap_mode="r")[start:stop]
    order = np.argsort(region, kind="stable")
    k = found.rows.shape[1]
    ranks = found.rows[order].astype(np.int32 if found.rows.max(initial=0) < 2**31 else np.int64)
    cols = {"region": pa.array(region[order]),
            "row": pa.array(np.arange(start, stop, dtype=np.int64)[order]),
            "ranks": pa.FixedSizeListArray.from_arrays(pa.array(ranks.reshape(-1)), k)}
    if scores:
        cols["scores"] = pa.FixedSizeListArray.from_arrays(
            pa.array(found.scores[order].reshape(-1), type=pa.float32()), k)
    table = pa.table(cols)
    bounds = np.flatnonzero(np.diff(region[order])) + 1
    path = _shuffle_path(work, part)
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, table.schema) as writer:
        for a, b in zip(np.r_[0, bounds], np.r_[bounds, len(order)]):
            writer.write_table(table.slice(int(a), int(b - a)))
    return part


def _read_region(work: WorkDir, parts: list[str], region: int
                 ) -> tuple[np.ndarray, Neighbours]:
    """Rows (ascending) and rank lists of one region, from every block's shuffle file."""
    tables = [pq.read_table(_shuffle_path(work, p), filters=[("region", "=", region)])
              for p in parts]
    return _rank_table(pa.concat_tables(tables))


def _rank_table(table: pa.Table) -> tuple[np.ndarray, Neighbours]:
    rows = table.column("row").to_numpy()
    col = table.column("ranks").combine_chunks()
    k = col.type.list_size
    ranks = col.flatten().to_numpy().reshape(-1, k).astype(np.int64)
    if "scores" in table.column_names:
        scores = table.column("scores").combine_chunks().flatten().to_numpy().reshape(-1, k)
    else:
        scores = np.zeros((len(rows), 0), np.float32)
    order = np.argsort(rows, kind="stable")  # blocks come in row order: already sorted
    return rows[order], Neighbours(rows=ranks[order], scores=scores[order])


# -- clusters (and negatives) per region ---------------------------------------------------

def _region_out(work: WorkDir, region: int):
    name = "leftover" if region < 0 else f"r{region:06d}"
    return work.path("clustered") / f"{name}.parquet"


def _leftover_in(work: WorkDir, region: int):
    return work.path("clustered") / f"r{region:06d}-leftover.parquet"


def _mine_rows(work: WorkDir, config: MiningConfig, region: int, rows: np.ndarray,
               ranks: Neighbours) -> dict[str, Any]:
    """Cluster one region's rows, write its negatives, its clusters and its leftovers."""
    result = core.mine_region(rows, ranks.rows, config, leftover_region=region < 0)
    if config.negatives.mode != "none" and result.members.size:
        q = np.load(work.path(QUERIES), mmap_mode="r")
        t = np.load(_target_matrix_path(work), mmap_mode="r")
        queries = np.asarray(q[rows])
        pos = positive_scores(queries, np.asarray(t[rows]))
        neg = core.region_negatives(rows, ranks, result.members, queries, t, pos, config,
                                    core.region_rng(config.seed, region))
        store = np.load(work.path(NEGATIVES), mmap_mode="r+")
        store[rows] = neg + 1  # 0 = none: the zero-filled file needs no initialisation
        store.flush()
        del store
    k = config.cluster_size
    if region >= 0:
        left = result.leftover
        lt = {"row": pa.array(rows[left]),
              "ranks": pa.FixedSizeListArray.from_arrays(
                  pa.array(ranks.rows[left].reshape(-1)), ranks.rows.shape[1])}
        if ranks.scores.shape[1]:
            lt["scores"] = pa.FixedSizeListArray.from_arrays(
                pa.array(ranks.scores[left].reshape(-1), type=pa.float32()),
                ranks.scores.shape[1])
        write_parquet(_leftover_in(work, region), pa.table(lt))
        dropped = np.zeros(0, np.int64)
    else:
        dropped = rows[result.leftover]
    write_parquet(_region_out(work, region), pa.table({
        "members": pa.FixedSizeListArray.from_arrays(pa.array(result.members.reshape(-1)), k),
        "padded": pa.FixedSizeListArray.from_arrays(pa.array(result.padded.reshape(-1)), k),
    }))
    return {"region": region, "rows": len(rows), "clusters": len(result.members),
            "edges": result.edges, "cross_region": result.cross_region,
            "communities": [int(c) for c in result.communities],
            "dropped": [int(r) for r in dropped]}


def region_task(work_root: str, config: MiningConfig, region: int, parts: list[str],
                delay: float = 0.0, fail: bool = False) -> dict[str, Any]:
    _maybe_fail("clusters", fail)
    _delay(delay)
    work = WorkDir(work_root)
    rows, ranks = _read_region(work, parts, region)
    return _mine_rows(work, config, region, rows, ranks)


def leftover_task(work_root: str, config: MiningConfig, n_regions: int) -> dict[str, Any]:
    work = WorkDir(work_root)
    tables = [pq.read_table(_leftover_in(work, r)) for r in range(n_regions)]
    rows, ranks = _rank_table(pa.concat_tables(tables))
    return _mine_rows(work, config, -1, rows, ranks)


def _region_meta(work: WorkDir, region: int) -> dict[str, Any] | None:
    """A finished region's summary (written after its files), None while it is unfinished."""
    path = work.path("clustered") / f"{_region_out(work, region).stem}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _finish_region(work_root: str, meta: dict[str, Any]) -> dict[str, Any]:
    work = WorkDir(work_root)
    write_json(work.path("clustered") / f"{_region_out(work, meta['region']).stem}.json", meta)
    return meta


def run_clusters(job: _Job, n_rows: int, n_regions: int, parts: list[str]
                 ) -> dict[str, Any]:
    work, config = job.work, job.config
    if config.negatives.mode != "none":
        allocate_npy(work.path(NEGATIVES), (n_rows, config.negatives.k), np.int64)
    work.path("clustered").mkdir(exist_ok=True)
    fail = job.fail_stage == "clusters"
    metas = {r: _region_meta(work, r) for r in range(n_regions)}
    futures = []
    for j, r in enumerate(r for r in range(n_regions) if metas[r] is None):
        fut = job.submit(region_task, job.root, config, r, parts, job.delay, fail=fail and j == 0)
        futures.append(job.submit(_finish_region, job.root, fut))
    for meta in job.gather("clusters", futures, done=n_regions - len(futures),
                           total=n_regions + 1):
        metas[meta["region"]] = meta
    leftover = _region_meta(work, -1) or job.submit(
        _finish_region, job.root, job.submit(leftover_task, job.root, config, n_regions)
    ).result()
    ordered = [metas[r] for r in range(n_regions)] + [leftover]
    counts = [m["clusters"] for m in ordered]
    edges, cross = sum(m["edges"] for m in ordered[:-1]), sum(m["cross_region"]
                                                              for m in ordered[:-1])
    window = n_rows * config.m
    return {"n_regions": n_regions, "region_clusters": counts,
            "n_clusters": int(sum(counts)), "cluster_size": config.cluster_size,
            "edges": int(edges), "cross_region": int(cross),
            "leftover_rows": int(leftover["rows"]), "dropped": leftover["dropped"],
            "communities": int(sum(len(m["communities"]) for m in ordered)),
            "window_entries_in_region": round(1 - cross / max(window, 1), 4)}


# -- batches ---------------------------------------------------------------------------------

def copy_clusters_task(work_root: str, config: MiningConfig, region: int, offset: int) -> int:
    """Region ``region``'s clusters -> rows [offset, offset + C_r) of the global table."""
    work = WorkDir(work_root)
    t = pq.read_table(_region_out(work, region))
    k = config.cluster_size
    members = t.column("members").combine_chunks().flatten().to_numpy().reshape(-1, k)
    padded = t.column("padded").combine_chunks().flatten().to_numpy(
        zero_copy_only=False).reshape(-1, k)
    fill_npy(work.path(MEMBERS), offset, members)
    fill_npy(work.path(MEMBER_PADDED), offset, padded)
    return len(members)


def _batch_part(work: WorkDir, epoch: int, task: int):
    return work.path("batch_parts") / f"e{epoch:05d}-t{task:05d}.npy"


def key_range_task(work_root: str, config: MiningConfig, n_clusters: int, epoch: int,
                   task: int, n_tasks: int, chunk: int = 1 << 20) -> int:
    """Slots (positions in the epoch's cluster order) of the clusters whose key falls in key
    range ``task`` of ``n_tasks``: writes (slot, cluster) pairs, sorted by slot."""
    work = WorkDir(work_root)
    lo = (task << 64) // n_tasks
    hi = ((task + 1) << 64) // n_tasks
    before, mine_c, mine_k = 0, [], []
    for a in range(0, n_clusters, chunk):  # keys of all clusters, never all their members
        ids = np.arange(a, min(a + chunk, n_clusters), dtype=np.uint64)
        keys = core.epoch_keys(config.seed, epoch, ids)
        before += int((keys < np.uint64(lo)).sum())
        inside = (keys >= np.uint64(lo)) & ((keys < np.uint64(hi)) if hi < 1 << 64 else True)
        mine_c.append(ids[inside].astype(np.int64))
        mine_k.append(keys[inside])
    clusters = np.concatenate(mine_c) if mine_c else np.zeros(0, np.int64)
    keys = np.concatenate(mine_k) if mine_k else np.zeros(0, np.uint64)
    order = np.lexsort((clusters, keys))
    slots = before + np.arange(len(order), dtype=np.int64)
    write_npy(_batch_part(work, epoch, task), np.stack([slots, clusters[order]]))
    return len(order)


def run_batches(job: _Job, region_clusters: list[int]) -> dict[str, Any]:
    work, config = job.work, job.config
    n_clusters, k = int(sum(region_clusters)), config.cluster_size
    allocate_npy(work.path(MEMBERS), (n_clusters, k), np.int64)
    allocate_npy(work.path(MEMBER_PADDED), (n_clusters, k), bool)
    offsets = np.concatenate([[0], np.cumsum(region_clusters)[:-1]])
    regions = list(range(len(region_clusters) - 1)) + [-1]  # the leftover region last
    copies = [job.submit(copy_clusters_task, job.root, config, r, int(o))
              for r, o in zip(regions, offsets)]
    job.gather("batches", copies, total=len(copies) + 1)
    work.path("batch_parts").mkdir(exist_ok=True)
    per_task = 1024 * config.clusters_per_batch  # clusters of ~1024 batches per key range
    n_tasks = max(1, -(-n_clusters // per_task))
    todo = [(e, t) for e in range(config.epochs) for t in range(n_tasks)
            if not _batch_part(work, e, t).exists()]
    job.gather("batches", [job.submit(key_range_task, job.root, config, n_clusters, e, t,
                                      n_tasks) for e, t in todo])
    return {"n_clusters": n_clusters, "key_ranges": n_tasks}


def epoch_order(work: WorkDir, config: MiningConfig, epoch: int, n_tasks: int,
                n_clusters: int) -> tuple[np.ndarray, np.ndarray]:
    """(nb, C) cluster ids of each batch and fill flags, as ``epoch_cluster_order`` returns."""
    parts = [np.load(_batch_part(work, epoch, t)) for t in range(n_tasks)]
    order = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
    cpb = config.clusters_per_batch
    full, rest = divmod(n_clusters, cpb)
    fill = np.zeros(full * cpb, bool)
    if config.last_batch == "fill" and rest:
        used = order[: full * cpb]
        need = cpb - rest
        pool = used if len(used) else order
        extra = epoch_rng(config.seed, epoch).choice(pool, size=need, replace=len(pool) < need)
        order = np.concatenate([order, extra])
        fill = np.r_[np.zeros(n_clusters, bool), np.ones(need, bool)]
        full += 1
    else:
        order = order[: full * cpb]
    return order.reshape(full, cpb), fill.reshape(full, cpb)


# -- write -----------------------------------------------------------------------------------

WRITE_BATCHES = 1024  # batches assembled per step of the write task


class _StoredNegatives:
    """``negatives1.npy`` (row + 1, 0 = none) read as the plan's negatives (-1 = none), only
    the rows asked for: the plan writer takes them a row group at a time."""

    def __init__(self, stored: np.ndarray):
        self.stored = stored

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self.stored[rows]) - 1

def _assemble_batches(work: WorkDir, config: MiningConfig, bt: dict[str, Any],
                      members: np.ndarray, member_padded: np.ndarray) -> Batches:
    """Every epoch's (nb, B) rows, clusters and padding, in ``write-*.npy`` files."""
    k = config.cluster_size
    epochs = [epoch_order(work, config, e, bt["key_ranges"], bt["n_clusters"])
              for e in range(config.epochs)]  # cluster ids: N / K entries each
    shape = (config.epochs, epochs[0][0].shape[0], k * config.clusters_per_batch)
    batches = Batches(*(np.lib.format.open_memmap(work.path(f"write-{name}.npy"), mode="w+",
                                                  dtype=dtype, shape=shape)
                        for name, dtype in (("rows", np.int64), ("cluster", np.int32),
                                            ("padded", bool))))
    for e, (order, fill) in enumerate(epochs):
        for b0 in range(0, len(order), WRITE_BATCHES):
            o, f = order[b0:b0 + WRITE_BATCHES], fill[b0:b0 + WRITE_BATCHES]
            at = slice(b0, b0 + len(o))
            batches.rows[e, at] = members[o].reshape(len(o), -1)
            batches.cluster[e, at] = np.repeat(o, k, axis=1).reshape(len(o), -1)
            batches.padded[e, at] = (member_padded[o] | f[..., None]).reshape(len(o), -1)
    return batches


def region_write_task(work_root: str, config: MiningConfig, out: str,
                      metas: dict[str, dict[str, Any]], timings: dict[str, float],
                      report: bool = True, fail: bool = False) -> str:
    _maybe_fail("write", fail)
    work = WorkDir(work_root)
    load, cl, bt = metas["load"], metas["clusters"], metas["batches"]
    n = int(load["n_rows"])
    # memory-mapped inputs, batches assembled into memory-mapped files: the task's heap does
    # not grow with N (b3mine.plan writes the tables a row group at a time)
    members = np.load(work.path(MEMBERS), mmap_mode="r")
    member_padded = np.load(work.path(MEMBER_PADDED), mmap_mode="r")
    batches = _assemble_batches(work, config, bt, members, member_padded)
    negatives = None
    if config.negatives.mode != "none":
        negatives = _StoredNegatives(np.load(work.path(NEGATIVES), mmap_mode="r"))
    communities = []
    for r in list(range(cl["n_regions"])) + [-1]:
        meta = _region_meta(work, r)
        communities += meta["communities"] if meta else []
    clustered = Clusters(members=members, padded=member_padded,
                         dropped=np.asarray(cl["dropped"], np.int64),
                         community_sizes=np.asarray(communities, np.int64))
    graph = {"edges": cl["edges"], "mean_degree": 2 * cl["edges"] / max(n, 1),
             "regions": cl["n_regions"], "region_size": config.region_size,
             "window_entries_in_region": cl["window_entries_in_region"],
             "leftover_rows": cl["leftover_rows"]}
    emb = work_embeddings(work, read_ids(work), load["source"])
    plan = finish_plan(emb, load["fingerprint"], config, graph, clustered, batches, negatives,
                       out, timings=timings, report=report)
    return str(plan.path)


# -- the stages, for the engine ----------------------------------------------------------------

def run(job: _Job, load: dict[str, Any], nb: dict[str, Any], *, report: bool
        ) -> tuple[str, dict[str, float]]:
    """The region-parallel stages after ``neighbours``; returns the plan's path and timings."""
    if job.config.batch_grouping != "random":
        raise ValueError("region-parallel mining assembles batches by random grouping only "
                         "(batch_grouping='affinity' needs the whole cluster graph)")
    n = int(load["n_rows"])
    parts: list[str] = nb["parts"]
    blocks = [(name, *_part_range(name)) for name in parts]
    reg = job.stage("regions", lambda: run_regions(job, n, blocks))
    todo = [b for b in blocks if not _shuffle_path(job.work, b[0]).exists()]
    fail = job.fail_stage == "graph"

    def graph() -> dict[str, Any]:
        job.work.path("shuffle").mkdir(exist_ok=True)
        job.gather("graph", [job.submit(shuffle_task, job.root, job.config, name, a, b,
                                        fail=fail and j == 0)
                             for j, (name, a, b) in enumerate(todo)],
                   done=len(blocks) - len(todo), total=len(blocks))
        return {"blocks": len(blocks)}

    job.stage("graph", graph)
    cl = job.stage("clusters", lambda: run_clusters(job, n, reg["n_regions"], parts))
    job.stage("batches", lambda: run_batches(job, cl["region_clusters"]))
    timings = job.timings(REGION_STAGES[:-1])
    written = job.stage("write", lambda: {"plan": job.one(
        "write", region_write_task, job.root, job.config, str(job.out), job.metas, timings,
        report=report)})
    timings["write"] = float(written["seconds"])
    return written["plan"], timings


def _part_range(part: str) -> tuple[int, int]:
    """Row range of a neighbour part from its name (``stages.part_name``)."""
    _, _, start, stop = part.split("-")
    return int(start), int(stop)


__all__ = ["REGION_STAGES", "run"]
