"""Where a trainer reads a batch plan from: the `PlanSource` protocol and `LocalPlan`.

A plan source answers the few questions a sampler asks: the plan's shape (epochs, batches per
epoch, batch size, rows of the dataset it was mined from), one epoch's batches as an Arrow table
(columns ``epoch, batch, position, row, id, cluster, padded``, in plan order) and the extra hard
negatives of one batch. `LocalPlan` reads a plan directory; `trainers.client.PlanClient` asks
the REST service. Both satisfy `PlanSource`, so samplers and collators never care which.

>>> from trainers.plans import LocalPlan
>>> plan = LocalPlan("plans/0123456789abcdef")            # doctest: +SKIP
>>> plan.epochs, plan.batches_per_epoch, plan.batch_size  # doctest: +SKIP
(2, 15, 128)
>>> plan.epoch_table(0).column_names                      # doctest: +SKIP
['epoch', 'batch', 'position', 'row', 'id', 'cluster', 'padded']
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import pyarrow as pa

from b3mine.errors import B3MineError, PlanError
from b3mine.plan import BatchPlan, PlanManifest, PlanShape
from b3mine.sharding import ShardError
from b3mine.sharding import rank_slice as _rank_slice

#: Columns every epoch table carries (a source may add more, e.g. ``negatives``).
EPOCH_COLUMNS = ("epoch", "batch", "position", "row", "id", "cluster", "padded")
#: Columns of `PlanSource.batch_negatives`: one line per (position, negative).
NEGATIVE_COLUMNS = ("position", "row", "id")


class PlanDatasetMismatch(B3MineError, ValueError):
    """The plan and the training dataset disagree (ids missing, lengths differ, id types)."""


class PlanExhausted(PlanError):
    """Training asked for an epoch the plan does not have."""


@runtime_checkable
class PlanSource(Protocol):
    """What samplers need from a plan, wherever it lives."""

    @property
    def plan_id(self) -> str: ...

    @property
    def manifest(self) -> PlanManifest: ...

    @property
    def epochs(self) -> int: ...

    @property
    def batch_size(self) -> int: ...

    @property
    def batches_per_epoch(self) -> int: ...

    @property
    def n_rows(self) -> int:
        """Rows of the dataset the plan was mined from (plan ``row`` values lie in [0, n_rows))."""
        ...

    @property
    def has_negatives(self) -> bool: ...

    def epoch_table(self, epoch: int) -> pa.Table:
        """One epoch in plan order, with at least the `EPOCH_COLUMNS`."""
        ...

    def batch_negatives(self, epoch: int, batch: int) -> pa.Table:
        """Extra hard negatives of one batch: columns ``position, row, id`` (``id`` may be null
        where the source does not know the row's id); empty when the plan has none."""
        ...


def rank_slice(batch_size: int, rank: int, world_size: int) -> slice:
    """Positions of a global batch that ``rank`` of ``world_size`` trains on.

    `b3mine.sharding.rank_slice`, the rule the service's ``?rank=&world_size=`` uses too: rank r
    gets [r*B/w, (r+1)*B/w), so the ranks' slices concatenated in rank order are the mined batch.

    >>> rank_slice(8, 1, 4)
    slice(2, 4, None)
    """
    try:
        return _rank_slice(batch_size, rank, world_size)
    except ShardError as exc:
        if exc.field == "world_size" and world_size >= 1:
            raise ShardError("world_size", f"{exc}: every rank must get an equal slice of each "
                             f"mined batch (mine with a batch_size that is a multiple of the "
                             f"number of processes)") from exc
        raise


def check_epoch(source: PlanSource, epoch: int) -> None:
    """Raise `PlanExhausted` when ``epoch`` is past the plan's last epoch."""
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if epoch >= source.epochs:
        raise PlanExhausted(
            f"plan {source.plan_id} has {source.epochs} epoch(s) (0..{source.epochs - 1}); "
            f"epoch {epoch} was requested. Mine the plan with more epochs, train fewer epochs, "
            f"or pass on_exhausted='cycle' to the sampler to reuse the plan's epochs in turn"
        )


def check_epoch_table(source: PlanSource, epoch: int, table: pa.Table) -> pa.Table:
    """Validate the shape of an epoch table a source produced (cheap: no per-row checks)."""
    missing = [c for c in EPOCH_COLUMNS if c not in table.column_names]
    if missing:
        raise PlanError(f"plan {source.plan_id} epoch {epoch}: columns {missing} missing "
                        f"(got {table.column_names})")
    expected = source.batches_per_epoch * source.batch_size
    if table.num_rows != expected:
        raise PlanError(
            f"plan {source.plan_id} epoch {epoch}: {table.num_rows} rows, expected "
            f"batches_per_epoch*batch_size = {expected}"
        )
    return table


def negatives_by_position(rows: pa.Array, ids: pa.Array) -> pa.Table:
    """`batch_negatives` lines from per-position list arrays of negative rows and ids (null or
    empty lists: no negatives at that position)."""
    lengths = rows.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
    return pa.table({
        "position": pa.array(np.repeat(np.arange(len(rows), dtype=np.int32), lengths)),
        "row": rows.flatten().cast(pa.int64()),
        "id": ids.flatten(),
    })


def empty_negatives(id_type: pa.DataType = pa.int64()) -> pa.Table:
    return pa.table({"position": pa.array([], pa.int32()), "row": pa.array([], pa.int64()),
                     "id": pa.array([], id_type)})


class LocalPlan(PlanShape):
    """A plan directory on this machine (`b3mine.plan.BatchPlan`), as a `PlanSource`.

    >>> plan = LocalPlan("plans/0123456789abcdef")            # doctest: +SKIP
    >>> plan.batch_negatives(0, 0).to_pylist()[:2]            # doctest: +SKIP
    [{'position': 0, 'row': 811, 'id': 1811}, {'position': 0, 'row': 57, 'id': 1057}]
    """

    def __init__(self, plan: BatchPlan | str | Path, *, validate: bool = False) -> None:
        self._plan = plan if isinstance(plan, BatchPlan) else BatchPlan.open(plan,
                                                                          validate=validate)

    def __repr__(self) -> str:
        return f"LocalPlan({str(self._plan.path)!r})"

    # The plan's memory-mapped tables are caches: rebuild them after pickling
    # (spawned DataLoader workers, multiprocessing) instead of shipping memory maps around.
    def __getstate__(self) -> dict:
        return {"path": str(self._plan.path)}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    @property
    def path(self) -> Path:
        return self._plan.path

    @property
    def plan(self) -> BatchPlan:
        return self._plan

    @property
    def manifest(self) -> PlanManifest:
        return self._plan.manifest

    def epoch_table(self, epoch: int) -> pa.Table:
        check_epoch(self, epoch)
        return check_epoch_table(self, epoch, self._plan.epoch_table(epoch))

    def batch_negatives(self, epoch: int, batch: int) -> pa.Table:
        id_type = pa.int64() if self.manifest.dataset.id_type == "int64" else pa.string()
        rows = self._plan.batch_table(epoch, batch).column("row").to_numpy()
        taken = self._plan.negatives_take(rows)
        if taken is None:
            return empty_negatives(id_type)
        return negatives_by_position(taken["negative_rows"], taken["negative_ids"])


def epoch_arrays(source: PlanSource, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, ids, padded) of one epoch, each shaped (batches_per_epoch, batch_size)."""
    table = source.epoch_table(epoch)
    shape = (source.batches_per_epoch, source.batch_size)
    rows = table.column("row").to_numpy().reshape(shape)
    ids = np.asarray(table.column("id").to_numpy(zero_copy_only=False)).reshape(shape)
    padded = np.asarray(table.column("padded").to_numpy(zero_copy_only=False)).reshape(shape)
    return rows, ids, padded
