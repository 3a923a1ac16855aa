"""Re-mining in a sentence-transformers run: a `TrainerCallback` and a batch-sampler factory
around one `trainers.remine.Refresher`.

>>> refresher = Refresher(LocalSubmitter("plans", "out/remine"), ids=train_ids,       # doctest: +SKIP
...                       mining_config=cfg, every=100, current=LocalPlan(plan_dir),
...                       run="st-run", embed=st_embed(model, anchors, positives))
>>> args = SentenceTransformerTrainingArguments(                                    # doctest: +SKIP
...     "out", batch_sampler=refreshing_batch_sampler(refresher, ids=train_ids))
>>> trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=train,  # doctest: +SKIP
...                                      loss=loss, callbacks=[RemineCallback(refresher)])

The callback calls ``refresher.after_step(global_step)`` after every optimizer step (the student
embeds the pairs there, then the plan is mined in the background); the sampler takes a finished
plan when the trainer starts its next epoch. Refresh events go to the trainer's log
(``state.log_history``) and to `RemineCallback.events`.

Not covered here: resuming a sentence-transformers checkpoint across refreshes (the Hugging Face
trainer replays the sampler to skip trained batches, which would need the refresher's state
first); the reference trainer (`b3mine train --remine-every`) resumes exactly. The batch
sampler is also used for an eval dataset: give the trainer none, or evaluate with an evaluator.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from transformers import TrainerCallback

from trainers.remine import Refresher, RefreshingBatchSampler, one_thread
from trainers.samplers import PlanBatchSampler

logger = logging.getLogger(__name__)


def st_embed(model: Any, queries: Sequence[str], targets: Sequence[str], *,
             batch_size: int = 64) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
    """The refresher's ``embed``: the SentenceTransformer's unit-norm embeddings of both sides,
    on one thread (the same weights give the same bytes, hence the same plan id)."""
    def embed() -> tuple[np.ndarray, np.ndarray]:
        with one_thread():
            return tuple(np.asarray(model.encode(list(texts), batch_size=batch_size,
                                                 convert_to_numpy=True,
                                                 normalize_embeddings=True,
                                                 show_progress_bar=False), dtype=np.float32)
                         for texts in (queries, targets))  # type: ignore[return-value]

    return embed


def refreshing_batch_sampler(refresher: Refresher, **options: Any) -> Callable[..., Any]:
    """``batch_sampler=`` for `SentenceTransformerTrainingArguments`: a `RefreshingBatchSampler`
    on the refresher's current plan, shaped for accelerate like
    `PlanBatchSampler.for_accelerator` (``options``: ids, negatives, on_exhausted, ...)."""
    def build(dataset: Any, batch_size: int = 0, drop_last: bool = False,
              valid_label_columns: list[str] | None = None, generator: Any = None,
              seed: int = 0) -> RefreshingBatchSampler:
        inner = PlanBatchSampler.for_accelerator(refresher.current, None, dataset=dataset,
                                                 **options)
        return RefreshingBatchSampler.wrap(inner, refresher)

    return build


class RemineCallback(TrainerCallback):
    """Drives a `Refresher` from a Hugging Face / sentence-transformers trainer."""

    def __init__(self, refresher: Refresher) -> None:
        self.refresher = refresher
        self.events: list[dict[str, Any]] = []

    def _record(self, state: Any, events: list[dict[str, Any]]) -> None:
        for event in events:
            logger.info("remine %s", event)
            self.events.append(event)
            state.log_history.append(event)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._record(state, self.refresher.after_step(state.global_step))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._record(state, self.refresher.close())
