"""sentence-transformers (>= 5) adapter: train a `SentenceTransformerTrainer` on a mined plan.

sentence-transformers builds its batch sampler itself, by calling the class given as
``SentenceTransformerTrainingArguments(batch_sampler=...)`` with ``(dataset, batch_size=,
drop_last=, valid_label_columns=, generator=, seed=)`` (a class or any callable).
`PlanSTBatchSampler.configure` binds a plan (and how to match its ids to the training dataset)
into such a callable, one that pickles: the trainer saves its arguments at every checkpoint.

>>> from sentence_transformers import SentenceTransformerTrainingArguments
>>> from trainers.sentence_transformers import PlanSTBatchSampler
>>> sampler = PlanSTBatchSampler.configure("plans/0123456789abcdef", ids=train_ids)  # doctest: +SKIP
>>> args = SentenceTransformerTrainingArguments("out", batch_sampler=sampler)       # doctest: +SKIP

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
from dataclasses import dataclass
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from torch.utils.data import SequentialSampler

from b3mine.plan import BatchPlan
from trainers.plans import PlanDatasetMismatch, PlanSource
from trainers.sources import open_source
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
    """A `DefaultBatchSampler` that replays a plan; pass ``PlanSTBatchSampler.configure(plan)``
    as ``batch_sampler=``.

    Everything but ``dataset`` that the trainer passes is accepted and ignored, except that
    ``batch_size`` is replaced by the plan's (per-process) batch size or ``None``.
    """

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
    ) -> PlanSTSamplerFactory:
        """A picklable callable building this sampler for ``plan``, to pass as ``batch_sampler=``.

        The trainer ``torch.save``s its arguments at every checkpoint, so what ``batch_sampler``
        holds must pickle: the factory pickles as its options and the plan's location (a
        `LocalPlan` as its directory, a `PlanClient` as its settings), not as a class made at
        run time. Call ``configure`` on a subclass (defined at module level) to build that.

        ``other_datasets="sequential"``: sentence-transformers also builds the eval
        dataloader with ``batch_sampler``; a dataset that is not the plan's (other length) is
        then batched in order instead of raising `PlanDatasetMismatch`.
        """
        options = {"ids": ids, "id_column": id_column, "negatives": negatives,
                   "on_exhausted": on_exhausted, "split_batches": split_batches}
        return PlanSTSamplerFactory(open_source(plan), options, other_datasets, cls)

    def __init__(self, dataset: Any, batch_size: int, drop_last: bool,
                 valid_label_columns: list[str] | None = None, generator: Any = None,
                 seed: int = 0, *, source: PlanSource | None = None,
                 options: dict[str, Any] | None = None,
                 other_datasets: Literal["error", "sequential"] = "error") -> None:
        super().__init__(dataset, batch_size=batch_size, drop_last=drop_last,
                         valid_label_columns=valid_label_columns, generator=generator, seed=seed)
        if source is None:
            raise TypeError("use PlanSTBatchSampler.configure(plan, ...) and pass what it "
                            "returns as batch_sampler=")
        self._source, self._options = source, dict(options or {})
        self.plan_sampler: PlanBatchSampler | None = None
        try:
            self.plan_sampler = PlanBatchSampler.for_accelerator(
                source, None, dataset=dataset, **self._options)
        except PlanDatasetMismatch as exc:
            expected = self._expected_rows()
            if other_datasets != "sequential" or len(dataset) == expected:
                raise
            logger.warning("dataset of %d rows is not plan %s's (%d rows): batching it in "
                           "order (%s)", len(dataset), source.plan_id, expected, exc)
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
        return len(ids) if ids is not None else self._source.n_rows

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


@dataclass(frozen=True, eq=False)
class PlanSTSamplerFactory:
    """What `PlanSTBatchSampler.configure` returns: called by the trainer like a sampler class
    (``factory(dataset, batch_size=, drop_last=, ...)``), and picklable, so that checkpoints
    (``training_args.bin``) can be written and ``resume_from_checkpoint`` works."""

    source: PlanSource
    options: dict[str, Any]
    other_datasets: Literal["error", "sequential"] = "error"
    sampler_class: type[PlanSTBatchSampler] = PlanSTBatchSampler

    def __call__(self, dataset: Any, **trainer_kwargs: Any) -> PlanSTBatchSampler:
        return self.sampler_class(dataset, source=self.source, options=self.options,
                                  other_datasets=self.other_datasets, **trainer_kwargs)

    def __repr__(self) -> str:  # the options may hold a dataset's worth of ids
        return f"{self.sampler_class.__name__}.configure({self.source!r})"
