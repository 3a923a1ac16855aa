"""Plans out, in formats trainers already read: ``b3mine export PLAN --format st|jsonl``.

* ``st``: a Hugging Face ``datasets`` folder (``save_to_disk``) in the n-tuple layout of
  sentence-transformers' ``mine_hard_negatives``: ``anchor``, ``positive``, ``negative_1`` ..
  ``negative_k``; load it with ``datasets.load_from_disk`` and train it with
  ``MultipleNegativesRankingLoss`` (or any loss that takes that layout).
* ``jsonl``: FlagEmbedding's layout, one ``{"query": str, "pos": [str], "neg": [str, ...]}`` per
  line.

Rows are in plan order: epoch 0's batches, batch by batch, position by position, then epoch 1's
(``epoch=`` exports one epoch). Row ``i`` of the export is position ``i % B`` of batch
``i // B``. ``k`` negatives per row: the plan's extra hard negatives (``--negatives hnps``) by
default; a row whose list is shorter (the positive-aware filter removed some), or every row when
``negatives=k`` asks for more than the plan has, is completed with the positives of the next
positions of its own batch, which the in-batch loss already uses as its negatives, so that
every row has ``k`` (``mine_hard_negatives`` would drop such a row instead, and break the batch).

What is lost: the batch boundaries. A trainer that shuffles rows (sentence-transformers'
default batch sampler does) trains on the hard negatives but not on the mined batches. To keep
them, either train on the original dataset with ``trainers.sentence_transformers.
PlanSTBatchSampler.configure(plan)``, or train on the export without shuffling, in batches of
exactly the plan's ``batch_size`` (a sequential batch sampler; see docs/training.md); the
export's ``b3mine_export.json`` records the batch size and the epochs it holds.

Texts: the embeddings file the plan was mined from holds them when it was written by
``b3mine embed`` / ``mine --texts`` (``query_text``/``target_text``); otherwise pass the text
file (``texts=``), whose rows must be the plan's rows (same order; checked by id when it has an
``id`` column).
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow.parquet as pq

from b3mine.errors import InputError, PlanError
from b3mine.plan import BatchPlan
from b3mine.texts import TextSource, read_texts

Format = Literal["st", "jsonl"]
TEXT_COLUMNS = ("query_text", "target_text")
INFO_FILE = "b3mine_export.json"


def _texts_from_embeddings(source: str | None, n_rows: int, what: str
                           ) -> tuple[list[str], list[str], np.ndarray]:
    if not source or not Path(source).is_file():
        raise InputError(f"{what}: the plan records no readable embeddings file to take the "
                         "texts from", file=source, expected="--texts FILE")
    names = pq.read_schema(source).names
    if not all(c in names for c in TEXT_COLUMNS):
        raise InputError(f"{what}: the embeddings file holds no texts", file=source,
                         expected=f"columns {list(TEXT_COLUMNS)} (written by b3mine embed), "
                         "or --texts FILE")
    table = pq.read_table(source, columns=["id", *TEXT_COLUMNS])
    if table.num_rows != n_rows:
        raise InputError(f"{what}: the embeddings file no longer matches the plan", file=source,
                         expected=f"{n_rows} rows", got=str(table.num_rows))
    ids = np.asarray(table.column("id").to_numpy(zero_copy_only=False))
    return (table.column("query_text").to_pylist(), table.column("target_text").to_pylist(), ids)


def plan_texts(plan: BatchPlan, texts: TextSource | str | Path | None = None
               ) -> tuple[list[str], list[str]]:
    """(queries, targets) aligned with the plan's rows ``[0, n_rows)`` (module doc)."""
    m = plan.manifest
    if not m.dataset.paired:
        raise InputError("only plans of (query, target) pairs can be exported",
                         file=str(plan.path), expected="a paired plan", got="a single corpus")
    if texts is not None:
        if m.mixture is not None:
            raise InputError("--texts takes one file; a mixture plan reads each dataset's texts "
                             "from the embeddings files it records", file=str(texts))
        pairs = read_texts(texts)
        if len(pairs) != m.dataset.n_rows or pairs.targets is None:
            raise InputError("the texts are not the plan's rows", file=pairs.source,
                             expected=f"{m.dataset.n_rows} pairs", got=str(len(pairs)))
        queries, targets, ids = pairs.queries, pairs.targets, pairs.ids
    elif m.mixture is None:
        queries, targets, ids = _texts_from_embeddings(m.dataset.source, m.dataset.n_rows,
                                                       f"plan {plan.plan_id}")
    else:
        queries, targets, parts = [], [], []
        for d in m.mixture.datasets:
            q, t, i = _texts_from_embeddings(d.source, d.n_rows, f"dataset {d.name!r}")
            queries += q
            targets += t
            parts.append(np.char.add(f"{d.name}/", i.astype(str)))
        ids = np.concatenate(parts)
    _check_ids(plan, ids)
    return queries, targets


def _check_ids(plan: BatchPlan, ids: np.ndarray) -> None:
    """The plan's clustered rows carry the ids the texts have at those rows."""
    clusters = plan.clusters_table()
    rows = clusters.column("row").to_numpy()
    want = np.asarray(clusters.column("id").to_numpy(zero_copy_only=False)).astype(str)
    got = ids[rows].astype(str)
    bad = np.flatnonzero(want != got)
    if len(bad):
        raise InputError("the texts are not the rows the plan was mined from",
                         row=int(rows[bad[0]]), expected=f"id {want[bad[0]]!r}",
                         got=f"{got[bad[0]]!r}")


def _negatives(plan: BatchPlan, rows: np.ndarray, k: int) -> np.ndarray:
    """(len(rows), k) negative rows per position: the plan's, completed in-batch (module doc)."""
    b = plan.batch_size
    taken = plan.negatives_take(rows)
    lists = taken["negative_rows"].to_pylist() if taken is not None else [None] * len(rows)
    out = np.empty((len(rows), k), np.int64)
    for i, negs in enumerate(lists):
        chosen = [r for r in (negs or []) if r != rows[i]][:k]
        start = (i // b) * b
        batch = rows[start : start + b]
        j = i - start
        for step in range(1, b):
            if len(chosen) >= k:
                break
            other = int(batch[(j + step) % b])
            if other != rows[i] and other not in chosen:
                chosen.append(other)
        if not chosen:
            raise InputError(f"row {int(rows[i])} has no negative and its batch no other row",
                             expected="batch_size >= 2 or --k-neg 0")
        out[i] = (chosen * k)[:k]  # a batch too small for k distinct others: repeat
    return out


def _atomic_dir(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")


def _publish(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.old")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    else:
        os.replace(tmp, out)


def export_plan(
    plan: BatchPlan | str | Path,
    out: str | Path,
    *,
    format: Format = "st",
    texts: TextSource | str | Path | None = None,
    epochs: Sequence[int] | None = None,
    negatives: int | None = None,
) -> Path:
    """Write ``plan`` as ``format`` to ``out`` (a folder for ``st``, a file for ``jsonl``),
    atomically; return ``out``. ``epochs``: which epochs, in order (default all); ``negatives``:
    negatives per row (default: the plan's ``k``, 0 without extra negatives)."""
    if format not in ("st", "jsonl"):
        raise InputError(f"unknown export format {format!r}", expected="st or jsonl")
    plan = plan if isinstance(plan, BatchPlan) else BatchPlan.open(plan)
    epochs = list(range(plan.epochs)) if epochs is None else list(epochs)
    for e in epochs:
        if not 0 <= e < plan.epochs:
            raise PlanError(f"plan {plan.plan_id}: epoch {e} out of range [0, {plan.epochs})")
    k = plan.manifest.counts.extra_negatives if negatives is None else negatives
    if k < 0:
        raise InputError("negatives must be >= 0", got=str(k))
    queries, targets = plan_texts(plan, texts)
    rows = np.concatenate([plan.batch_rows(e).reshape(-1) for e in epochs]) if epochs else \
        np.zeros(0, np.int64)
    neg = _negatives(plan, rows, k) if k else np.zeros((len(rows), 0), np.int64)
    anchor = [queries[r] for r in rows.tolist()]
    positive = [targets[r] for r in rows.tolist()]
    out = Path(out)
    tmp = _atomic_dir(out)
    info = {"plan_id": plan.plan_id, "format": format, "batch_size": plan.batch_size,
            "epochs": epochs, "batches_per_epoch": plan.batches_per_epoch, "rows": len(rows),
            "negatives": k}
    try:
        if format == "st":
            import datasets

            columns = {"anchor": anchor, "positive": positive}
            for j in range(k):
                columns[f"negative_{j + 1}"] = [targets[r] for r in neg[:, j].tolist()]
            datasets.Dataset.from_dict(columns).save_to_disk(str(tmp))
            (tmp / INFO_FILE).write_text(json.dumps(info, indent=2))
        else:
            with open(tmp, "w") as f:
                for i in range(len(rows)):
                    f.write(json.dumps({"query": anchor[i], "pos": [positive[i]],
                                        "neg": [targets[r] for r in neg[i].tolist()]}) + "\n")
        _publish(tmp, out)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
    return out
