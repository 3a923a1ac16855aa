"""A job's work directory: stage outputs, ``<stage>.done`` markers and ``progress.json``.

Layout of ``<out>/.work/<job_id>/``::

    load.done            marker (JSON): fingerprint, n_rows, dim, paired, id kind, seconds
    ids.npy              dataset ids, in row order (int64, or fixed-width strings)
    id-parts/<start>.npy one per load shard: (id, row) in hash-bucket order (+ .bounds.npy)
    queries.npy          prepared (normalised) vectors; targets.npy for paired data
    raw_queries.npy      the input vectors, kept only to compute the dataset fingerprint
    neighbours/part-*.parquet   one file per query block: rows, scores (fixed-size lists)
    graph.parquet        upper-triangle edges (src, dst) of the window graph
    clusters.parquet     cluster, row, padded;  communities.parquet, dropped.parquet
    batches.parquet      epoch, batch, position, row, cluster, padded
    negatives.parquet    negative_rows (fixed-size list) per dataset row
    progress.json        {"stage", "fraction", "stages": {...}, "state", "error"}

Vectors are ``.npy`` rather than Parquet on purpose: every neighbour task memory-maps a block of
rows, and a memory-mapped ``.npy`` gives that for free. Every file is written under a temporary
name and renamed into place, and a stage's marker is written last, so a marker means "all of
this stage's files are complete". A killed task leaves at most a hidden ``.tmp`` file.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

PIPELINE_STAGES = ("load", "neighbours", "graph", "clusters", "batches", "negatives", "write")


def tmp_name(path: Path) -> Path:
    """A hidden, unique sibling of ``path`` to write into before the atomic rename."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path; on success rename it to ``path`` (on failure, remove it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, data: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))


def write_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def allocate_npy(path: Path, shape: tuple[int, ...], dtype: Any) -> None:
    """Create a zero-filled ``.npy`` once (sparse on most filesystems), so that tasks can fill
    disjoint slices of it (`fill_npy`)."""
    if not path.exists():
        with atomic_path(path) as tmp:  # creating the memmap writes the header and size
            np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)


def fill_npy(path: Path, start: int, values: np.ndarray) -> None:
    """Write ``values`` into rows [start, start + len(values)) of an `allocate_npy` file."""
    out = np.load(path, mmap_mode="r+")
    out[start:start + len(values)] = values
    out.flush()
    del out


def write_parquet(path: Path, table: pa.Table, **kwargs: Any) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **{"write_page_checksum": True, **kwargs})


class WorkDir:
    """One job's checkpoint directory (shared by the client and every worker)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, name: str) -> Path:
        return self.root / name

    def marker(self, stage: str) -> Path:
        return self.root / f"{stage}.done"

    def is_done(self, stage: str) -> bool:
        return self.marker(stage).is_file()

    def meta(self, stage: str) -> dict[str, Any]:
        """The JSON a finished stage left in its marker."""
        return json.loads(self.marker(stage).read_text())

    def mark_done(self, stage: str, meta: dict[str, Any] | None = None) -> None:
        write_json(self.marker(stage), {"stage": stage, "finished_at": time.time(),
                                        **(meta or {})})

    def clean_tmp(self) -> None:
        """Remove temporary files a killed task may have left (never a finished file)."""
        if not self.root.exists():
            return
        for tmp in self.root.rglob(".*.tmp"):
            tmp.unlink(missing_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


class ProgressFile:
    """``progress.json``: what an out-of-process reader (the service) polls.

    Writes are atomic and throttled (at most every ``interval`` seconds, except stage ends).
    """

    def __init__(self, path: Path, job_id: str, interval: float = 0.5) -> None:
        self.path, self.job_id, self.interval = path, job_id, interval
        self.state: dict[str, Any] = {"job_id": job_id, "state": "running", "stage": None,
                                      "fraction": 0.0, "stages": {}, "error": None}
        self._last = 0.0

    def update(self, stage: str, fraction: float, *, status: str | None = None) -> None:
        self.state["stage"], self.state["fraction"] = stage, round(float(fraction), 4)
        if status:
            self.state["stages"][stage] = status
        now = time.monotonic()
        if status or fraction >= 1.0 or now - self._last >= self.interval:
            self._last = now
            self.flush()

    def finish(self, state: str, **extra: Any) -> None:
        self.state.update(state=state, **extra)
        self.flush()

    def flush(self) -> None:
        self.state["updated_at"] = time.time()
        write_json(self.path, self.state)


def read_progress(out: str | Path, job_id: str) -> dict[str, Any] | None:
    """The latest progress of job ``job_id`` under plan root ``out`` (None if unknown).

    While the job runs (or after it failed) this is ``<out>/.work/<job_id>/progress.json``; once
    the plan is written and the work directory removed, the job's record ``<job_id>.json`` next
    to it says ``state: done`` and names the plan.
    """
    work = Path(out) / ".work"
    for path in (work / job_id / "progress.json", work / f"{job_id}.json"):
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            continue
    return None
