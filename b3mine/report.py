"""Quality report: how much harder the plan's batches are than random batches of the same data.

Hardness is the teacher similarity between in-batch non-pairs, score(q_i, t_j) for i != j in one
batch; the false-negative risk is the share of those pairs scoring above the query's own
positive, score(q_i, t_i). Both are measured on the plan and on random batches of the same size.
"""
from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

from b3mine.neighbours import at_most, max_norm, pair_scores, score_error

PERCENTILES = (50, 90, 99)


def batch_similarity(
    queries: np.ndarray,
    targets: np.ndarray,
    batches: np.ndarray,
    *,
    max_batches: int,
    rng: np.random.Generator,
    keep_per_batch: int = 2000,
) -> dict[str, Any]:
    """Statistics of score(q_i, t_j), i != j, over (a sample of) ``batches`` (nb, B).

    Every figure is the same on every engine (a plan's report is one of its files): the mean
    comes from row sums (sum_ij q_i.t_j = (sum q).(sum t)), the share above the positive is
    decided exactly near the bound (duplicates tie with it), and the sampled values are
    rescored with `pair_scores`. A row's positive score is computed for the sampled batches
    only (`pair_scores`, float64): memory does not grow with the dataset.
    """
    if len(batches) > max_batches:
        batches = batches[np.sort(rng.choice(len(batches), max_batches, replace=False))]
    total = above = 0
    acc = 0.0
    sample = []
    norm = max_norm(targets) if len(batches) else 0.0
    for rows in batches:
        rows = np.asarray(rows)
        pos = pair_scores(queries, targets, rows, rows)
        s = queries[rows] @ targets[rows].T
        same = rows[:, None] == rows[None, :]  # also skips repeats of one example (padding)
        off = ~same
        total += int(off.sum())
        q_sum = np.asarray(queries[rows], np.float64).sum(axis=0)
        t_sum = np.asarray(targets[rows], np.float64).sum(axis=0)
        acc += float((q_sum * t_sum).sum()) - float((same * pos[:, None]).sum())
        bound = np.broadcast_to(pos[:, None], s.shape)
        cand = np.broadcast_to(rows, s.shape)
        below = at_most(s, bound, score_error(queries[rows], norm), queries, targets, rows, cand)
        above += int((~below & off).sum())
        qi, tj = np.nonzero(off)
        take = min(keep_per_batch, len(qi))
        pick = np.sort(rng.choice(len(qi), take, replace=False)) if take < len(qi) \
            else np.arange(len(qi))
        sample.append(pair_scores(queries, targets, rows[qi[pick]], rows[tj[pick]])
                      .astype(np.float32))
    values = np.concatenate(sample) if sample else np.zeros(0, np.float32)
    stats = {
        "batches_measured": int(len(batches)),
        "mean": acc / total if total else 0.0,
        "above_positive_share": above / total if total else 0.0,
    }
    for q in PERCENTILES:
        stats[f"p{q}"] = float(np.percentile(values, q)) if values.size else 0.0
    stats["_values"] = values  # for the plot; dropped from the JSON
    return stats


def random_batches(n_rows: int, batch_size: int, n_batches: int, rng: np.random.Generator
                   ) -> np.ndarray:
    n_batches = min(n_batches, n_rows // batch_size)  # fill policies can outnumber the rows
    order = rng.permutation(n_rows)[: n_batches * batch_size]
    return order.reshape(-1, batch_size)


def quality_report(
    queries: np.ndarray,
    targets: np.ndarray,
    plan_batches: np.ndarray,
    community_sizes: np.ndarray,
    *,
    seed: int = 0,
    max_batches: int = 64,
    random_rows: np.ndarray | None = None,
) -> dict[str, Any]:
    """Hardness of ``plan_batches`` (nb, B) against random batches, plus community sizes.

    ``random_rows``: the baseline batches (nb', B) when plain random batches over all rows are
    not the fair comparison (a mixture compares with random batches inside each dataset)."""
    rng = np.random.default_rng([seed, 0x4E9])
    nb, batch_size = plan_batches.shape
    plan = batch_similarity(queries, targets, plan_batches, max_batches=max_batches, rng=rng)
    if random_rows is None:
        random_rows = random_batches(len(queries), batch_size, max(nb, 1), rng)
    rand = batch_similarity(queries, targets, random_rows, max_batches=max_batches, rng=rng)
    report = {
        "plan": plan,
        "random": rand,
        "mean_similarity_ratio": plan["mean"] / rand["mean"] if rand["mean"] > 0 else None,
        "mean_similarity_gain": plan["mean"] - rand["mean"],
        "above_positive_ratio": (plan["above_positive_share"] / rand["above_positive_share"]
                                 if rand["above_positive_share"] > 0 else None),
        "communities": _size_summary(community_sizes),
    }
    report["_community_sizes"] = community_sizes
    return report


def _size_summary(sizes: np.ndarray) -> dict[str, float]:
    if not len(sizes):
        return {"count": 0}
    return {
        "count": int(len(sizes)),
        "min": int(sizes.min()),
        "median": float(np.median(sizes)),
        "max": int(sizes.max()),
        "singletons": int((sizes == 1).sum()),
    }


def report_json(report: dict[str, Any]) -> str:
    """The report without its raw arrays (keys starting with '_')."""

    def clean(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: clean(v) for k, v in obj.items() if not k.startswith("_")}
        return obj

    return json.dumps(clean(report), indent=2, sort_keys=True)


def report_png(report: dict[str, Any], title: str = "") -> bytes:
    """Two panels: in-batch similarity (plan vs random) and community sizes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    plan, rand = report["plan"]["_values"], report["random"]["_values"]
    lo = float(min(plan.min(initial=0), rand.min(initial=0)))
    hi = float(max(plan.max(initial=1), rand.max(initial=1)))
    bins = np.linspace(lo, hi, 80)
    ax1.hist(rand, bins=bins, alpha=0.6, density=True, label=f"random (mean {report['random']['mean']:.3f})")
    ax1.hist(plan, bins=bins, alpha=0.6, density=True, label=f"plan (mean {report['plan']['mean']:.3f})")
    ax1.set_xlabel("teacher similarity of in-batch non-pairs")
    ax1.set_ylabel("density")
    ax1.legend()
    ax1.set_title("batch hardness")
    sizes = report["_community_sizes"]
    if len(sizes):
        ax2.hist(sizes, bins=np.unique(np.geomspace(1, max(2, sizes.max()), 40).astype(int)))
        ax2.set_xscale("log")
        ax2.set_yscale("log")
    ax2.set_xlabel("community size (before splitting to K)")
    ax2.set_ylabel("communities")
    ax2.set_title("communities found")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
