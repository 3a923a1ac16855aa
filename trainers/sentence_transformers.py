"""sentence-transformers (>= 5) adapter: train a `SentenceTransformerTrainer` on a mined plan.

sentence-transformers builds its batch sampler itself, by calling the class given as
``SentenceTransformerTrainingArguments(batch_sampler=...)`` with ``(dataset, batch_size=,
drop_last=, valid_label_columns=, generator=, seed=)``. `PlanSTBatchSampler.configure` binds a
plan (and how to match its ids to the training dataset) into such a class:

>>> from sentence_transformers import SentenceTransformerTrainingArguments
>>> from trainers.sentence_transformers import PlanSTBatchSampler
>>> sampler_cls = PlanSTBatchSampler.configure("plans/0123456789abcdef", ids=train_ids)  # doctest: +SKIP
>>> args = SentenceTransformerTrainingArguments("out", batch_sampler=sampler_cls)       # doctest: +SKIP

The trainer's ``per_device_train_batch_size`` is ignored: batches are the plan's. Under
multi-process training the sampler yields each mined batch's per-process slices interleaved,
which accelerate's sharding deals out so that process r trains on slice r of every batch (set
``split_batches=True`` here if you run accelerate with ``split_batches=True``).

Don't keep an id column in the training dataset: sentence-transformers tokenizes every column
it is given (an extra column becomes an extra text input of the loss). Pass ``ids=`` (a list in
dataset order) and remove the column, or match by row with neither.

This module is named after the package it adapts; absolute imports inside it still resolve to
the real ``sentence_transformers`` (``from __future__`` Python 3 imports are never relative).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

from torch.utils.data import SequentialSampler

from b3mine.plan import BatchPlan
from trainers.plans import PlanDatasetMismatch, PlanSource, open_source
from trainers.samplers import OnExhausted, PlanBatchSampler

try:
    from sentence_transformers.base.sampler import DefaultBatchSampler
except ImportError:  # sentence-transformers < 5.x layout
    try:
        from sentence_transformers.sampler import DefaultBatchSampler  # type: ignore[no-redef]
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "trainers.sentence_transformers needs sentence-transformers>=5: "
            "pip install 'b3mine[train]'"
        ) from exc

logger = logging.getLogger(__name__)


class PlanSTBatchSampler(DefaultBatchSampler):
    """A `DefaultBatchSampler` that replays a plan; build one with `configure`.

    Everything but ``dataset`` that the trainer passes is accepted and ignored, except that
    ``batch_size`` is replaced by the plan's (per-process) batch size or ``None``.
    """

    _source: ClassVar[PlanSource | None] = None
    _options: ClassVar[dict[str, Any]] = {}
    _other_datasets: ClassVar[str] = "error"

    @classmethod
    def configure(
        cls,
        plan: PlanSource | BatchPlan | str | Path,
        *,
        ids: Sequence | None = None,
        id_column: str | None = None,
        negatives: bool = False,
        on_exhausted: OnExhausted = "error",
        split_batches: bool = False,
        other_datasets: Literal["error", "sequential"] = "error",
    ) -> type[PlanSTBatchSampler]:
        """A subclass bound to ``plan``, to pass as ``batch_sampler=``.

        ``other_datasets="sequential"``: sentence-transformers also builds the eval
        dataloader with ``batch_sampler``; a dataset that is not the plan's (other length) is
        then batched in order instead of raising `PlanDatasetMismatch`.
        """
        source = open_source(plan)
        options = {"ids": ids, "id_column": id_column, "negatives": negatives,
                   "on_exhausted": on_exhausted, "split_batches": split_batches}
        return type(f"{cls.__name__}_{source.plan_id}", (cls,),
                    {"_source": source, "_options": options, "_other_datasets": other_datasets,
                     "__module__": cls.__module__})

    def __init__(self, dataset: Any, batch_size: int, drop_last: bool,
                 valid_label_columns: list[str] | None = None, generator: Any = None,
                 seed: int = 0) -> None:
        super().__init__(dataset, batch_size=batch_size, drop_last=drop_last,
                         valid_label_columns=valid_label_columns, generator=generator, seed=seed)
        if self._source is None:
            raise TypeError("use PlanSTBatchSampler.configure(plan, ...) and pass the class it "
                            "returns as batch_sampler=")
        self.plan_sampler: PlanBatchSampler | None = None
        try:
            self.plan_sampler = PlanBatchSampler.for_accelerator(
                self._source, None, dataset=dataset, **self._options)
        except PlanDatasetMismatch as exc:
            expected = self._expected_rows()
            if self._other_datasets != "sequential" or len(dataset) == expected:
                raise
            logger.warning("dataset of %d rows is not plan %s's (%d rows): batching it in "
                           "order (%s)", len(dataset), self._source.plan_id, expected, exc)
        if self.plan_sampler is not None:
            # Report the plan's batch shape, not the trainer's per_device_train_batch_size:
            # accelerate drops batches whose length differs from ``batch_size``.
            self.batch_size = self.plan_sampler.batch_size
            self.drop_last = False
        else:
            self.sampler = SequentialSampler(dataset)
            self.drop_last = False

    def _expected_rows(self) -> int:
        ids = self._options.get("ids")
        return len(ids) if ids is not None else self._source.n_rows  # type: ignore[union-attr]

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if self.plan_sampler is not None:
            self.plan_sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        if self.plan_sampler is None:
            return super().__iter__()
        return iter(self.plan_sampler)

    def __len__(self) -> int:
        if self.plan_sampler is None:
            return super().__len__()
        return len(self.plan_sampler)

    def state_dict(self) -> dict[str, Any]:
        return self.plan_sampler.state_dict() if self.plan_sampler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.plan_sampler is not None:
            self.plan_sampler.load_state_dict(state)
