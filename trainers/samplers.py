"""`PlanBatchSampler`: a PyTorch batch sampler that replays a mined plan, batch by batch.

It yields lists of dataset indices in plan order, one list per mined batch (or per rank's slice
of it), so a ``DataLoader(dataset, batch_sampler=sampler)`` trains on exactly the batches that
were mined. Plan rows are matched to the training dataset either by position (the plan's
``row`` is the dataset index: the default, checked against the dataset's length) or by id
(``ids=`` / ``id_column=``: the plan's ``id`` column looked up in the dataset's ids).

>>> from torch.utils.data import DataLoader
>>> from trainers import LocalPlan, PlanBatchSampler
>>> sampler = PlanBatchSampler(LocalPlan("plans/0123456789abcdef"), dataset=train_ds)  # doctest: +SKIP
>>> loader = DataLoader(train_ds, batch_sampler=sampler, num_workers=2)                 # doctest: +SKIP
>>> for epoch in range(sampler.epochs):                                                 # doctest: +SKIP
...     sampler.set_epoch(epoch)
...     for batch in loader:
...         ...

Distributed training: with ``world_size`` w > 1 (read from ``torch.distributed`` when it is
initialised) rank r trains on positions [r*B/w, (r+1)*B/w) of every mined batch, so the global
batch, all ranks together, is still the mined batch. ``layout="interleaved"`` instead yields
all w slices of each batch in rank order: the form wanted by wrappers that hand out whole
batches round-robin to the processes (accelerate's ``BatchSamplerShard`` with
``split_batches=False``, which is how the Hugging Face and sentence-transformers trainers run).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow.compute as pc
from torch.utils.data import BatchSampler

from b3mine.plan import BatchPlan
from trainers.plans import (
    PlanDatasetMismatch,
    PlanSource,
    check_epoch,
    epoch_arrays,
    rank_slice,
)
from trainers.sources import open_source

Layout = Literal["rank", "interleaved"]
OnExhausted = Literal["error", "cycle"]


class PlanStateMismatch(ValueError):
    """A `state_dict` that cannot be resumed by this sampler (another plan, world size, ...)."""


def distributed_defaults(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Fill ``rank``/``world_size`` from torch.distributed when it is initialised, else 0/1."""
    if rank is not None and world_size is not None:
        return rank, world_size
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank() if rank is None else rank
        world_size = dist.get_world_size() if world_size is None else world_size
    return (0 if rank is None else rank), (1 if world_size is None else world_size)


def _dataset_column(dataset: Any, name: str) -> np.ndarray:
    """One column of a dataset: Hugging Face / pandas / dict-of-lists, else item by item."""
    if hasattr(dataset, "column_names") or hasattr(dataset, "columns") or isinstance(dataset,
                                                                                     dict):
        try:
            return np.asarray(list(dataset[name]))
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanDatasetMismatch(f"the dataset has no id column {name!r}") from exc
    try:
        return np.asarray([dataset[i][name] for i in range(len(dataset))])
    except (KeyError, TypeError, IndexError) as exc:
        raise PlanDatasetMismatch(
            f"cannot read id column {name!r} from the dataset's items ({type(dataset).__name__}"
            f"[i][{name!r}] failed: {exc}); pass ids= with one id per dataset row instead"
        ) from exc


def _dataset_len(dataset: Any) -> int:
    if isinstance(dataset, dict):  # column-oriented: {"id": [...], "text": [...]}
        return len(next(iter(dataset.values()))) if dataset else 0
    return len(dataset)


class DatasetIndex:
    """Maps plan (row, id) pairs to indices of the training dataset.

    Without ids the plan's ``row`` is the dataset index, which is only sound when the dataset is
    the one the plan was mined from: the lengths must agree. With ids (one per dataset row, in
    dataset order) every plan id is looked up; a plan id the dataset lacks is an error that names
    it.

    >>> import numpy as np
    >>> index = DatasetIndex(n_plan_rows=3, ids=["b", "c", "a"])
    >>> index(np.array([0, 1]), np.array(["a", "b"])).tolist()
    [2, 0]
    """

    def __init__(self, *, n_plan_rows: int, dataset: Any = None, ids: Sequence | None = None,
                 id_column: str | None = None, plan_id: str = "?") -> None:
        self.plan_id = plan_id
        self.by_id = ids is not None or id_column is not None
        n_dataset = _dataset_len(dataset) if dataset is not None else None
        if ids is not None and id_column is not None:
            raise ValueError("pass ids= or id_column=, not both")
        if id_column is not None:
            if dataset is None:
                raise ValueError("id_column= needs dataset=")
            ids = _dataset_column(dataset, id_column)
        if not self.by_id:
            if n_dataset is not None and n_dataset != n_plan_rows:
                raise PlanDatasetMismatch(
                    f"plan {plan_id} was mined from {n_plan_rows} rows but the dataset has "
                    f"{n_dataset}: plan rows cannot be dataset indices. Pass the dataset the plan "
                    f"was mined from, or match by id with ids=/id_column="
                )
            self.n_rows = n_plan_rows
            return
        self.ids = np.asarray(ids)
        if self.ids.dtype.kind == "O":
            self.ids = self.ids.astype(str)
        if self.ids.ndim != 1:
            raise PlanDatasetMismatch(f"ids must be one-dimensional, got shape {self.ids.shape}")
        if n_dataset is not None and len(self.ids) != n_dataset:
            raise PlanDatasetMismatch(
                f"{len(self.ids)} ids given for a dataset of {n_dataset} rows: pass one id per "
                f"dataset row, in dataset order"
            )
        self.n_rows = len(self.ids)
        self._order = np.argsort(self.ids, kind="stable")
        self._sorted = self.ids[self._order]
        dup = self._sorted[1:][self._sorted[1:] == self._sorted[:-1]]
        if len(dup):
            raise PlanDatasetMismatch(
                f"the dataset's ids are not unique: {len(dup)} repeated, e.g. {dup[0]!r} "
                f"(a plan id must name exactly one dataset row)"
            )

    def __call__(self, rows: np.ndarray, ids: np.ndarray, *, where: str = "") -> np.ndarray:
        if not self.by_id:
            return np.asarray(rows, dtype=np.int64)
        ids = np.asarray(ids)
        if ids.dtype.kind == "O":
            ids = ids.astype(str)
        if len(ids) and (ids.dtype.kind in "iu") != (self._sorted.dtype.kind in "iu"):
            raise PlanDatasetMismatch(
                f"plan {self.plan_id} has {'integer' if ids.dtype.kind in 'iu' else 'string'} "
                f"ids but the dataset's ids are {self._sorted.dtype} (e.g. "
                f"{self._sorted[0]!r}); convert one side so that they compare equal"
            )
        flat = ids.reshape(-1)
        pos = np.searchsorted(self._sorted, flat)
        pos_ok = np.minimum(pos, max(len(self._sorted) - 1, 0))
        found = (pos < len(self._sorted)) & (self._sorted[pos_ok] == flat) if len(
            self._sorted) else np.zeros(len(flat), bool)
        if not found.all():
            missing = np.unique(flat[~found])
            shown = ", ".join(repr(x.item() if hasattr(x, "item") else x) for x in missing[:5])
            raise PlanDatasetMismatch(
                f"plan {self.plan_id}{where}: {len(missing)} id(s) of the plan are not in the "
                f"dataset, e.g. {shown} (the dataset has {self.n_rows} ids)"
            )
        return self._order[pos_ok].astype(np.int64).reshape(ids.shape)


class PlanBatchSampler(BatchSampler):
    """Yields the plan's batches as lists of dataset indices, in plan order.

    Args:
        source: a `PlanSource` (`LocalPlan`, `PlanClient`), a `BatchPlan`, a plan directory or a
            service URL ``http://host/v1/plans/<id>``.
        dataset: the training dataset; checks lengths (row matching) or reads ``id_column``.
        ids: one id per dataset row, in dataset order: match the plan's ``id`` column to them.
        id_column: read ``ids`` from this column of ``dataset``.
        epoch: the plan epoch to start with (see `set_epoch`).
        rank, world_size: this process's slice of each batch; default from torch.distributed.
        layout: ``"rank"`` yields this rank's slices only; ``"interleaved"`` yields every rank's
            slice of each batch in rank order (for accelerate, see the module doc).
        negatives: append each batch's extra hard negatives (dataset indices, deduplicated, none
            that is already in the global batch) after its positives; `HardNegativeCollator`
            splits them again. Batches then vary in length, so ``batch_size`` is ``None``.
        skip_padded: leave out rows that a fill policy added (batches then vary in length).
        on_exhausted: ``"error"`` raises `PlanExhausted` past the plan's last epoch; ``"cycle"``
            reuses plan epoch ``epoch % plan.epochs``.

    ``batch_size`` is the length of every yielded list, or ``None`` when lengths vary: accelerate
    silently drops batches whose length differs from a sampler's ``batch_size``.

    >>> sampler = PlanBatchSampler("plans/0123456789abcdef", world_size=2, rank=1)  # doctest: +SKIP
    >>> len(sampler), len(next(iter(sampler)))                                        # doctest: +SKIP
    (15, 64)
    """

    def __init__(
        self,
        source: PlanSource | BatchPlan | str | Path,
        *,
        dataset: Any = None,
        ids: Sequence | None = None,
        id_column: str | None = None,
        epoch: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        layout: Layout = "rank",
        negatives: bool = False,
        skip_padded: bool = False,
        on_exhausted: OnExhausted = "error",
    ) -> None:
        # BatchSampler.__init__ insists on a positive int batch_size and a sampler; this class
        # is its own sampler, so set the attributes that loaders and accelerate read directly.
        self.source = open_source(source)
        self.rank, self.world_size = distributed_defaults(rank, world_size)
        if layout not in ("rank", "interleaved"):
            raise ValueError(f"layout must be 'rank' or 'interleaved', got {layout!r}")
        if on_exhausted not in ("error", "cycle"):
            raise ValueError(f"on_exhausted must be 'error' or 'cycle', got {on_exhausted!r}")
        self.layout: Layout = layout
        self.on_exhausted: OnExhausted = on_exhausted
        self._slice = rank_slice(self.source.batch_size, self.rank, self.world_size)
        self.local_batch_size = self.source.batch_size // self.world_size
        if negatives and not self.source.has_negatives:
            raise ValueError(f"plan {self.source.plan_id} has no extra negatives (mine it with "
                             f"negatives.mode='hnps' or 'hnips'), but negatives=True")
        if negatives and skip_padded:
            raise ValueError("negatives=True needs a fixed number of positives per batch (the "
                             "collator splits on it): it cannot be combined with skip_padded")
        self.negatives = negatives
        self.skip_padded = skip_padded
        self.batch_size: int | None = None if (negatives or skip_padded) else self.local_batch_size
        self.drop_last = False
        self.sampler = None
        self.index = DatasetIndex(n_plan_rows=self.source.n_rows, dataset=dataset, ids=ids,
                                  id_column=id_column, plan_id=self.source.plan_id)
        self.epoch = epoch
        self._resume_at = 0  # batches of self.epoch already trained (set by load_state_dict)
        self._yielded = 0
        self._cache: tuple[int, np.ndarray, np.ndarray] | None = None
        self.unknown_negatives = 0  # negatives skipped because the source knew no id for them
        self._load(self.plan_epoch(epoch))  # fail fast: plan/dataset mismatches surface here

    # -- epochs ------------------------------------------------------------------------------
    @property
    def plan_id(self) -> str:
        return self.source.plan_id

    @property
    def epochs(self) -> int:
        """Epochs in the plan."""
        return self.source.epochs

    @property
    def parts(self) -> int:
        """Lists yielded per mined batch."""
        return self.world_size if self.layout == "interleaved" else 1

    def plan_epoch(self, epoch: int) -> int:
        if self.on_exhausted == "cycle" and self.source.epochs:
            return epoch % self.source.epochs
        check_epoch(self.source, epoch)
        return epoch

    def set_epoch(self, epoch: int) -> None:
        """Train plan epoch ``epoch`` on the next iteration (the loaded resume point is kept
        when ``epoch`` is the epoch it belongs to, so calling set_epoch after
        `load_state_dict` as every epoch loop does is safe)."""
        self.plan_epoch(epoch)  # raise PlanExhausted now, not at the first batch
        if epoch != self.epoch:
            self._resume_at = 0
        self.epoch = epoch

    def _load(self, plan_epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._cache is None or self._cache[0] != plan_epoch:
            rows, ids, padded = epoch_arrays(self.source, plan_epoch)
            index = self.index(rows, ids, where=f" epoch {plan_epoch}")
            self._cache = (plan_epoch, index, padded)
        return self._cache[1], self._cache[2]

    # -- iteration ---------------------------------------------------------------------------
    def __len__(self) -> int:
        """Lists the next iteration yields (fewer than a full epoch right after a resume)."""
        return self.source.batches_per_epoch * self.parts - self._resume_at

    def __iter__(self) -> Iterator[list[int]]:
        e = self.plan_epoch(self.epoch)
        index, padded = self._load(e)
        start, self._resume_at = self._resume_at, 0
        self._yielded = start
        parts = self.parts
        for step in range(start, self.source.batches_per_epoch * parts):
            k, part = divmod(step, parts)
            rank = part if self.layout == "interleaved" else self.rank
            sl = rank_slice(self.source.batch_size, rank, self.world_size)
            batch = index[k, sl]
            if self.skip_padded:
                batch = batch[~padded[k, sl]]
            out = batch.tolist()
            if self.negatives:
                out += self._negatives(e, k, sl, index[k])
            # Count before yielding: a loader pulls the next batch only when it needs it, so the
            # count is "handed out", which is what a checkpoint taken after a step must record.
            self._yielded = step + 1
            yield out

    def _negatives(self, e: int, k: int, sl: slice, batch_index: np.ndarray) -> list[int]:
        table = self.source.batch_negatives(e, k)
        pos = table.column("position")
        table = table.filter(pc.and_(pc.greater_equal(pos, sl.start), pc.less(pos, sl.stop)))
        if self.index.by_id:
            # A source may not know the id of a negative row (it need not be a clustered row).
            known = pc.is_valid(table.column("id"))
            table_known = table.filter(known)
            self.unknown_negatives += table.num_rows - table_known.num_rows
            table = table_known
        rows = table.column("row").to_numpy()
        ids = np.asarray(table.column("id").to_numpy(zero_copy_only=False))
        if not len(rows):
            return []
        found = self.index(rows, ids, where=f" epoch {e} batch {k} negatives")
        # A negative that is a positive anywhere in the global batch would be a false negative
        # for its own query; repeats would count one column twice.
        seen = set(batch_index.tolist())
        out = []
        for i in found.tolist():
            if i not in seen:
                seen.add(i)
                out.append(i)
        return out

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self, batches_done: int | None = None) -> dict[str, Any]:
        """Where training stands: resume with `load_state_dict` on a fresh sampler.

        ``batches_yielded`` counts the lists handed out in the current epoch. A DataLoader with
        workers pulls a few batches ahead of training, so there pass ``batches_done``, the
        number of batches of this epoch the model has trained on.
        """
        return {
            "plan_id": self.source.plan_id,
            "epoch": self.epoch,
            "batches_yielded": self._yielded if batches_done is None else int(batches_done),
            "rank": self.rank,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state`` stopped: the next iteration yields its next batch.

        Any rank may load the state another rank saved (the count is the same on every rank);
        the plan and, for ``layout="interleaved"``, the world size must be the same.
        """
        if state.get("plan_id") != self.source.plan_id:
            raise PlanStateMismatch(
                f"the state is from plan {state.get('plan_id')!r}, this sampler reads plan "
                f"{self.source.plan_id!r}: refusing to resume on a different plan"
            )
        done = int(state["batches_yielded"])
        if int(state.get("world_size", self.world_size)) != self.world_size and self.parts > 1:
            raise PlanStateMismatch(
                f"the state was saved with world_size {state['world_size']}, this sampler has "
                f"{self.world_size}; interleaved batches cannot be re-split"
            )
        epoch = int(state["epoch"])
        self.plan_epoch(epoch)
        total = self.source.batches_per_epoch * self.parts
        if not 0 <= done <= total:
            raise PlanStateMismatch(f"batches_yielded {done} outside [0, {total}] for plan "
                                    f"{self.source.plan_id}")
        self.epoch = epoch
        self._resume_at = done
        self._yielded = done

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(plan={self.source.plan_id!r}, epoch={self.epoch}, "
                f"rank={self.rank}, world_size={self.world_size}, layout={self.layout!r}, "
                f"batch_size={self.batch_size})")

    # -- accelerate ----------------------------------------------------------------------------
    @classmethod
    def for_accelerator(cls, source: PlanSource | BatchPlan | str | Path, accelerator: Any = None,
                        **kwargs: Any) -> PlanBatchSampler:
        """A sampler shaped for ``accelerator.prepare(DataLoader(...))``.

        accelerate shards a batch sampler itself: with ``split_batches=True`` it cuts every
        batch into equal per-process slices (our rank rule), so the sampler yields whole mined
        batches; otherwise it deals whole batches round-robin, so the sampler yields the slices
        interleaved. Either way process r trains on slice r of every mined batch.
        """
        if accelerator is not None:
            n = accelerator.num_processes
            split = bool(getattr(accelerator, "split_batches", False))
        else:
            from accelerate import PartialState

            n, split = PartialState().num_processes, bool(kwargs.pop("split_batches", False))
        kwargs.pop("split_batches", None)
        if split and n > 1 and (kwargs.get("negatives") or kwargs.get("skip_padded")):
            raise ValueError("accelerate's split_batches cuts every batch into equal slices, which "
                             "needs equal-length batches: use split_batches=False with "
                             "negatives=True or skip_padded=True")
        if split or n == 1:
            return cls(source, rank=0, world_size=1, **kwargs)
        return cls(source, rank=0, world_size=n, layout="interleaved", **kwargs)
